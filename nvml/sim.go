package nvml

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"os"
	"sync"
	"time"
)

// SimDefaultTotalMiB is the simulated GPU's size before the file was ever read.
const SimDefaultTotalMiB = 24576

// SimState is the JSON file the simulated trainer writes (atomically):
//
//	{"name": "Simulated GPU", "uuid": "GPU-sim-0", "total_mib": 24576, "used_mib": 9000,
//	 "processes": [{"pid": 1234, "name": "python3", "used_mib": 8000, "until": 1767225600}],
//	 "xids": [{"xid": 79, "time": 1767225600.5}]}
//
// A process with "until" in the past (unix seconds) is gone: it is left out
// and its memory is taken off used_mib.
type SimState struct {
	Name      string       `json:"name"`
	UUID      string       `json:"uuid"`
	TotalMiB  uint64       `json:"total_mib"`
	UsedMiB   uint64       `json:"used_mib"`
	Processes []SimProcess `json:"processes"`
	Xids      []SimXid     `json:"xids"`
}

// SimProcess is a process in SimState.
type SimProcess struct {
	PID     int      `json:"pid"`
	Name    string   `json:"name"`
	UsedMiB uint64   `json:"used_mib"`
	Until   *float64 `json:"until,omitempty"` // unix seconds; absent = forever
}

// SimXid is an Xid event in SimState.
type SimXid struct {
	Xid  uint64  `json:"xid"`
	Time float64 `json:"time"` // unix seconds
}

// SimFile is a Reader over a simulated GPU: one device, index 0, described by
// a SimState JSON file. A missing file means an idle GPU: the size of the
// last read (or SimDefaultTotalMiB), nothing used, no processes, no Xids.
type SimFile struct {
	path  string
	clock Clock

	mu   sync.Mutex
	last SimState // last successful read, for the size of a missing file
}

var _ Reader = (*SimFile)(nil)

// NewSimFile returns a Reader over the simulator's file at path.
func NewSimFile(path string) Reader { return NewSimFileClock(path, SystemClock) }

// NewSimFileClock is NewSimFile with the clock that decides which processes
// have expired.
func NewSimFileClock(path string, clock Clock) Reader {
	if clock == nil {
		clock = SystemClock
	}
	return &SimFile{path: path, clock: clock}
}

func (s *SimFile) read() (SimState, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	b, err := os.ReadFile(s.path)
	if errors.Is(err, fs.ErrNotExist) {
		total := s.last.TotalMiB
		if total == 0 {
			total = SimDefaultTotalMiB
		}
		return SimState{Name: s.last.Name, UUID: s.last.UUID, TotalMiB: total}, nil
	}
	if err != nil {
		return SimState{}, fmt.Errorf("nvml: sim: %w", err)
	}
	var st SimState
	if err := json.Unmarshal(b, &st); err != nil {
		return SimState{}, fmt.Errorf("nvml: sim: %s: %w", s.path, err)
	}
	if st.Name == "" {
		st.Name = "Simulated GPU"
	}
	if st.UUID == "" {
		st.UUID = "GPU-sim-0"
	}
	if st.TotalMiB == 0 {
		st.TotalMiB = SimDefaultTotalMiB
	}
	// Drop expired processes and their memory.
	now := s.clock.Now()
	live := st.Processes[:0]
	for _, p := range st.Processes {
		if p.Until != nil && unixTime(*p.Until).Before(now) {
			st.UsedMiB -= min(st.UsedMiB, p.UsedMiB)
			continue
		}
		live = append(live, p)
	}
	st.Processes = live
	st.UsedMiB = min(st.UsedMiB, st.TotalMiB)
	s.last = st
	return st, nil
}

func unixTime(sec float64) time.Time {
	whole, frac := math.Modf(sec)
	return time.Unix(int64(whole), int64(frac*1e9))
}

// Devices implements Reader.
func (s *SimFile) Devices() ([]Device, error) {
	st, err := s.read()
	if err != nil {
		return nil, err
	}
	if st.Name == "" {
		st.Name = "Simulated GPU"
	}
	if st.UUID == "" {
		st.UUID = "GPU-sim-0"
	}
	return []Device{{
		Index:       0,
		UUID:        st.UUID,
		Name:        st.Name,
		TotalBytes:  st.TotalMiB * MiB,
		UsedBytes:   st.UsedMiB * MiB,
		FreeBytes:   (st.TotalMiB - st.UsedMiB) * MiB,
		UtilPercent: -1,
		TempC:       -1,
	}}, nil
}

// Processes implements Reader.
func (s *SimFile) Processes(index int) ([]Process, error) {
	if index != 0 {
		return nil, fmt.Errorf("nvml: sim: device %d: %w", index, ErrNoDevice)
	}
	st, err := s.read()
	if err != nil {
		return nil, err
	}
	procs := make([]Process, 0, len(st.Processes))
	for _, p := range st.Processes {
		procs = append(procs, Process{PID: p.PID, Name: p.Name, UsedBytes: p.UsedMiB * MiB, Device: 0})
	}
	return procs, nil
}

// Info implements Reader.
func (s *SimFile) Info() (Info, error) { return Info{Driver: "simulated", CUDA: "simulated"}, nil }

// Xids implements Reader.
func (s *SimFile) Xids(since time.Time) ([]Xid, error) {
	st, err := s.read()
	if err != nil {
		return nil, err
	}
	all := make([]Xid, 0, len(st.Xids))
	for _, x := range st.Xids {
		all = append(all, Xid{Device: 0, UUID: st.UUID, Code: x.Xid, Time: unixTime(x.Time)})
	}
	return xidsSince(all, since), nil
}

// Close implements Reader.
func (s *SimFile) Close() error { return nil }
