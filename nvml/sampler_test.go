package nvml

import (
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"testing/synctest"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
)

// fixedClock is a Clock whose Now is set by the test; its tickers never fire.
type fixedClock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *fixedClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fixedClock) set(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = t
}

func (c *fixedClock) NewTicker(time.Duration) Ticker { return stoppedTicker{} }

type stoppedTicker struct{}

func (stoppedTicker) C() <-chan time.Time { return nil }
func (stoppedTicker) Stop()               {}

func writeSim(t *testing.T, path, body string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func TestSimFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "gpu.json")
	clock := &fixedClock{now: time.Unix(1000, 0)}
	r := NewSimFileClock(path, clock)
	defer r.Close()

	// Missing file: idle GPU of the default size.
	devs, err := r.Devices()
	if err != nil {
		t.Fatal(err)
	}
	if len(devs) != 1 || devs[0].TotalBytes != SimDefaultTotalMiB*MiB || devs[0].UsedBytes != 0 ||
		devs[0].FreeBytes != devs[0].TotalBytes || devs[0].UUID != "GPU-sim-0" {
		t.Fatalf("idle devices = %+v", devs)
	}
	if procs, err := r.Processes(0); err != nil || len(procs) != 0 {
		t.Fatalf("idle processes = %v, %v", procs, err)
	}

	writeSim(t, path, `{"name": "Simulated GPU", "uuid": "GPU-sim-0", "total_mib": 8192, "used_mib": 7000,
		"processes": [
			{"pid": 1234, "name": "python3", "used_mib": 5000},
			{"pid": 999, "name": "foreign", "used_mib": 1500, "until": 1010.5}
		],
		"xids": [{"xid": 79, "time": 1005.25}]}`)
	devs, _ = r.Devices()
	if devs[0].TotalBytes != 8192*MiB || devs[0].UsedBytes != 7000*MiB || devs[0].FreeBytes != 1192*MiB {
		t.Fatalf("devices = %+v", devs)
	}
	procs, _ := r.Processes(0)
	if len(procs) != 2 || procs[1] != (Process{PID: 999, Name: "foreign", UsedBytes: 1500 * MiB}) {
		t.Fatalf("processes = %+v", procs)
	}
	xids, _ := r.Xids(time.Unix(1005, 0))
	if len(xids) != 1 || xids[0].Code != 79 || !xids[0].Time.Equal(time.Unix(1005, 250e6)) || xids[0].Device != 0 {
		t.Fatalf("xids = %+v", xids)
	}
	if xids, _ := r.Xids(time.Unix(1006, 0)); xids == nil || len(xids) != 0 {
		t.Fatalf("late xids = %#v, want empty", xids)
	}

	// The foreign process expires: gone, and its memory with it.
	clock.set(time.Unix(1011, 0))
	procs, _ = r.Processes(0)
	if len(procs) != 1 || procs[0].PID != 1234 {
		t.Fatalf("processes after expiry = %+v", procs)
	}
	devs, _ = r.Devices()
	if devs[0].UsedBytes != 5500*MiB {
		t.Fatalf("used after expiry = %d MiB, want 5500", devs[0].UsedBytes/MiB)
	}

	// The file goes away: idle, but the size is remembered.
	os.Remove(path)
	devs, _ = r.Devices()
	if devs[0].TotalBytes != 8192*MiB || devs[0].UsedBytes != 0 {
		t.Fatalf("devices after removal = %+v", devs)
	}

	if _, err := r.Processes(1); !errors.Is(err, ErrNoDevice) {
		t.Fatalf("Processes(1) err = %v", err)
	}
	writeSim(t, path, `{"total_mib": `)
	if _, err := r.Devices(); err == nil {
		t.Fatal("a broken file read without error")
	}
}

func TestPick(t *testing.T) {
	devs := []Device{
		{Index: 0, UUID: "GPU-0aaa-1111", FreeBytes: 2 * gib},
		{Index: 1, UUID: "GPU-1bbb-2222", FreeBytes: 20 * gib},
		{Index: 2, UUID: "GPU-2ccc-3333", FreeBytes: 30 * gib},
		{Index: 3, UUID: "GPU-2ccd-4444", FreeBytes: 30 * gib},
	}
	tests := []struct {
		name    string
		visible string
		want    int
		wantErr bool
	}{
		{name: "unset means all", visible: "", want: 2},
		{name: "indices", visible: "0,1", want: 1},
		{name: "spaces", visible: " 0 , 3 ", want: 3},
		{name: "full uuid", visible: "GPU-0aaa-1111", want: 0},
		{name: "uuid prefix", visible: "GPU-1b,GPU-0a", want: 1},
		{name: "ambiguous prefix ends the list", visible: "0,GPU-2cc,3", want: 0},
		{name: "invalid entry ends the list", visible: "0,7,2", want: 0},
		{name: "minus one hides all", visible: "-1", wantErr: true},
		{name: "unknown uuid", visible: "GPU-zzz", wantErr: true},
		{name: "MIG not resolved", visible: "MIG-abc", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Pick(devs, tt.visible)
			if tt.wantErr {
				if !errors.Is(err, ErrNoDevice) {
					t.Fatalf("Pick = %d, %v; want ErrNoDevice", got, err)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("Pick = %d, %v; want %d", got, err, tt.want)
			}
		})
	}
	if _, err := Pick(nil, ""); !errors.Is(err, ErrNoDevice) {
		t.Fatalf("Pick(nil) err = %v", err)
	}
}

// stubReader is a Reader with fixed answers.
type stubReader struct {
	mu    sync.Mutex
	devs  []Device
	procs map[int][]Process
	err   error
}

func (s *stubReader) Devices() ([]Device, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Device(nil), s.devs...), nil
}

func (s *stubReader) Processes(i int) ([]Process, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Process(nil), s.procs[i]...), s.err
}
func (s *stubReader) Info() (Info, error)           { return Info{}, nil }
func (s *stubReader) Xids(time.Time) ([]Xid, error) { return nil, nil }
func (s *stubReader) Close() error                  { return nil }
func (s *stubReader) setUsed(i int, used, tree uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.devs[i].UsedBytes = used
	s.procs[i][0].UsedBytes = tree
}

func TestSamplerTreeMatching(t *testing.T) {
	r := &stubReader{
		devs: []Device{{Index: 0, TotalBytes: 24 * gib, UsedBytes: 12 * gib}, {Index: 1, TotalBytes: 24 * gib, UsedBytes: 3 * gib}},
		procs: map[int][]Process{
			0: {{PID: 100, UsedBytes: 8 * gib}, {PID: 101, UsedBytes: 1 * gib}, {PID: 555, UsedBytes: 3 * gib}},
			1: {{PID: 777, UsedBytes: 3 * gib}},
		},
	}
	tree := []int{100, 101, 102}
	clock := &fixedClock{now: time.Unix(50, 0)}
	s := NewSampler(r, time.Second, []int{0}, func() []int { return tree }, clock)
	got, err := s.Collect()
	if err != nil {
		t.Fatal(err)
	}
	want := Sample{Time: time.Unix(50, 0), Device: 0, UsedBytes: 12 * gib, TotalBytes: 24 * gib, TreeBytes: 9 * gib}
	if len(got) != 1 || got[0] != want {
		t.Fatalf("samples = %+v, want [%+v] (device 1 not watched)", got, want)
	}

	// PIDs from another namespace: fall back to the device figure.
	tree = []int{5, 6}
	got, _ = s.Collect()
	if !got[0].TreeFromDevice || got[0].TreeBytes != 12*gib {
		t.Fatalf("fallback sample = %+v", got[0])
	}
	// Process list unreadable: same fallback, error kept.
	r.err = gonvml.ERROR_NO_PERMISSION
	tree = []int{100}
	got, err = s.Collect()
	if !got[0].TreeFromDevice || !errors.Is(err, gonvml.ERROR_NO_PERMISSION) || !errors.Is(s.Err(), gonvml.ERROR_NO_PERMISSION) {
		t.Fatalf("sample = %+v, err = %v", got[0], err)
	}
	r.err = nil
	// Nothing running: no tree memory.
	tree = nil
	got, _ = s.Collect()
	if got[0].TreeBytes != 0 || got[0].TreeFromDevice {
		t.Fatalf("idle sample = %+v", got[0])
	}
	if len(s.Recent()) != 4 {
		t.Fatalf("recent = %d samples, want 4", len(s.Recent()))
	}
}

func TestSamplerRunPeakReset(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		r := &stubReader{
			devs:  []Device{{Index: 0, TotalBytes: 24 * gib, UsedBytes: 1 * gib}},
			procs: map[int][]Process{0: {{PID: 100, UsedBytes: 1 * gib}}},
		}
		s := NewSampler(r, 2*time.Second, nil, func() []int { return []int{100} }, nil)
		start := time.Now()
		go s.Run(t.Context())
		synctest.Wait() // first sample at once

		time.Sleep(3 * time.Second) // one tick at 2s
		r.setUsed(0, 20*gib, 18*gib)
		time.Sleep(2 * time.Second) // tick at 4s sees the peak
		r.setUsed(0, 5*gib, 4*gib)
		time.Sleep(2 * time.Second) // tick at 6s
		synctest.Wait()

		peak, ok := s.Peak()
		if !ok || peak.TreeBytes != 18*gib || !peak.Time.Equal(start.Add(4*time.Second)) || peak.TreeFromDevice {
			t.Fatalf("peak = %+v, %v; want 18 GiB at +4s", peak, ok)
		}
		recent := s.Recent()
		if len(recent) != 4 || !recent[0].Time.Equal(start) || !recent[3].Time.Equal(start.Add(6*time.Second)) {
			t.Fatalf("recent = %+v", recent)
		}

		s.Reset()
		if _, ok := s.Peak(); ok || len(s.Recent()) != 0 {
			t.Fatal("Reset kept samples")
		}
		time.Sleep(2 * time.Second)
		synctest.Wait()
		if peak, _ := s.Peak(); peak.TreeBytes != 4*gib {
			t.Fatalf("peak after reset = %+v", peak)
		}
	})
	// Run returned when the bubble's context was cancelled (synctest.Test
	// fails on goroutines left blocked).
}

func TestSamplerRecentRing(t *testing.T) {
	r := &stubReader{devs: []Device{{Index: 0}}}
	clock := &fixedClock{}
	s := NewSampler(r, time.Second, nil, nil, clock)
	for i := range RecentSamples + 10 {
		clock.set(time.Unix(int64(i), 0))
		s.Collect()
	}
	recent := s.Recent()
	if len(recent) != RecentSamples || recent[0].Time.Unix() != 10 || recent[RecentSamples-1].Time.Unix() != RecentSamples+9 {
		t.Fatalf("ring: %d samples from %v to %v", len(recent), recent[0].Time.Unix(), recent[len(recent)-1].Time.Unix())
	}
}

// benchLib and benchDevice answer the calls a sample makes without the
// call log that go-nvml's mock keeps (which grows without bound in a
// benchmark); any other call panics on the nil embedded interface.
type benchLib struct {
	gonvml.Interface
	dev gonvml.Device
}

func (benchLib) Init() gonvml.Return                  { return gonvml.SUCCESS }
func (benchLib) Shutdown() gonvml.Return              { return gonvml.SUCCESS }
func (benchLib) DeviceGetCount() (int, gonvml.Return) { return 1, gonvml.SUCCESS }
func (b benchLib) DeviceGetHandleByIndex(int) (gonvml.Device, gonvml.Return) {
	return b.dev, gonvml.SUCCESS
}
func (benchLib) SystemGetProcessName(int) (string, gonvml.Return) {
	return "python3", gonvml.SUCCESS
}

type benchDevice struct{ gonvml.Device }

func (benchDevice) GetUUID() (string, gonvml.Return) { return "GPU-aaa", gonvml.SUCCESS }
func (benchDevice) GetName() (string, gonvml.Return) { return "NVIDIA A100", gonvml.SUCCESS }
func (benchDevice) GetMemoryInfo() (gonvml.Memory, gonvml.Return) {
	return gonvml.Memory{Total: 40 * gib, Used: 20 * gib, Free: 20 * gib}, gonvml.SUCCESS
}
func (benchDevice) GetUtilizationRates() (gonvml.Utilization, gonvml.Return) {
	return gonvml.Utilization{Gpu: 90}, gonvml.SUCCESS
}
func (benchDevice) GetTemperature(gonvml.TemperatureSensors) (uint32, gonvml.Return) {
	return 60, gonvml.SUCCESS
}
func (benchDevice) GetComputeRunningProcesses() ([]gonvml.ProcessInfo, gonvml.Return) {
	return []gonvml.ProcessInfo{{Pid: 1234, UsedGpuMemory: 10 * gib}, {Pid: 1235, UsedGpuMemory: 5 * gib}, {Pid: 9, UsedGpuMemory: 5 * gib}}, gonvml.SUCCESS
}
func (benchDevice) GetGraphicsRunningProcesses() ([]gonvml.ProcessInfo, gonvml.Return) {
	return nil, gonvml.SUCCESS
}

// BenchmarkSample measures the CPU cost of one sample (one device, three
// processes, two of them in the trainer's tree) through the NVML adapter and
// the sampler, with a fake library (no driver time).
func BenchmarkSample(b *testing.B) {
	n := mustNew(b, benchLib{dev: benchDevice{}})
	s := NewSampler(n, time.Second, []int{0}, func() []int { return []int{1234, 1235, 1236} }, nil)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := s.Collect(); err != nil {
			b.Fatal(err)
		}
	}
}
