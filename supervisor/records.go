package supervisor

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/nnguard/nnguard/internal/atomicfile"
	"github.com/nnguard/nnguard/policy"
)

// Events appends one JSON object per line to <fold>/nnguard/events.jsonl.
// Each line is a single write(2) on an O_APPEND file and is fsynced, so a
// crash leaves whole lines only.
type Events struct {
	mu  sync.Mutex
	f   *os.File
	now func() time.Time
	err error // the first write error, sticky
}

// OpenEvents opens (creating) the event log.
func OpenEvents(path string, now func() time.Time) (*Events, error) {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("supervisor: event log: %w", err)
	}
	return &Events{f: f, now: now}, nil
}

// Emit writes one event. fields may not override time, event and attempt.
func (e *Events) Emit(event string, attempt int, fields map[string]any) error {
	m := make(map[string]any, len(fields)+3)
	for k, v := range fields {
		m[k] = v
	}
	m["time"] = e.now().UTC().Format(time.RFC3339Nano)
	m["event"] = event
	m["attempt"] = attempt
	b, err := json.Marshal(m)
	if err != nil {
		return fmt.Errorf("supervisor: event %s: %w", event, err)
	}
	b = append(b, '\n')
	e.mu.Lock()
	defer e.mu.Unlock()
	if _, err := e.f.Write(b); err != nil {
		return e.keep(fmt.Errorf("supervisor: cannot write the event log: %w", err))
	}
	if err := e.f.Sync(); err != nil {
		return e.keep(fmt.Errorf("supervisor: cannot sync the event log: %w", err))
	}
	return nil
}

func (e *Events) keep(err error) error {
	if e.err == nil {
		e.err = err
	}
	return err
}

// Err returns the first error any Emit met (nnguard stops: it must not run
// on without its records).
func (e *Events) Err() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.err
}

// Close closes the log.
func (e *Events) Close() error { return e.f.Close() }

// State is <fold>/nnguard/state.json: the settings in force and the history,
// written atomically before every attempt so that the same command, run
// again after nnguard was killed, continues where it stopped.
type State struct {
	Version         int    `json:"version"`
	Dataset         string `json:"dataset"`
	Configuration   string `json:"configuration"`
	Fold            string `json:"fold"`
	Trainer         string `json:"trainer"`
	PlansIdentifier string `json:"plans_identifier"` // the user's plans
	DerivedPlans    string `json:"derived_plans,omitempty"`
	// OriginalBatchSize is the batch size in the user's plans.
	OriginalBatchSize int             `json:"original_batch_size"`
	Settings          policy.Settings `json:"settings"`
	// EffectiveBatchSize is what the trainer printed in its configuration.
	EffectiveBatchSize int `json:"effective_batch_size,omitempty"`
	Attempts           int `json:"attempts"`
	// LastDoneEpoch is the highest epoch any attempt completed, -1 if none.
	LastDoneEpoch int             `json:"last_done_epoch"`
	History       []policy.Record `json:"history"`
	// Previous holds the history of earlier runs that gave up.
	Previous     []policy.Record  `json:"previous_history,omitempty"`
	LastDecision *policy.Decision `json:"last_decision,omitempty"`
	Outcome      string           `json:"outcome,omitempty"` // set when a run ends
	PeakGPUBytes uint64           `json:"peak_gpu_bytes,omitempty"`
	UpdatedAt    time.Time        `json:"updated_at"`
}

// StateVersion is the schema version of state.json.
const StateVersion = 1

// LoadState reads state.json; a missing file returns (nil, nil).
func LoadState(path string) (*State, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("supervisor: state: %w", err)
	}
	var s State
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, fmt.Errorf("supervisor: state %s is corrupt (%v); move it aside to start over", path, err)
	}
	if s.Version != StateVersion {
		return nil, fmt.Errorf("supervisor: state %s has version %d, this nnguard reads %d", path, s.Version, StateVersion)
	}
	return &s, nil
}

// Save writes the state atomically.
func (s *State) Save(path string, now time.Time) error {
	s.UpdatedAt = now.UTC()
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return fmt.Errorf("supervisor: state: %w", err)
	}
	return atomicfile.WriteFile(path, append(b, '\n'), 0o644)
}

// ErrLocked means another nnguard supervises the fold.
var ErrLocked = errors.New("another nnguard is supervising this fold")

// Lock takes an exclusive flock on path (held until the process exits or
// Unlock). The pid inside is informational.
type Lock struct{ f *os.File }

// AcquireLock takes the fold's lock or fails with ErrLocked at once.
func AcquireLock(path string) (*Lock, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return nil, fmt.Errorf("supervisor: lock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		b, _ := os.ReadFile(path)
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			pid := string(b)
			if pid == "" {
				pid = "?"
			}
			return nil, fmt.Errorf("supervisor: %w (pid %s, lock %s)", ErrLocked, pid, filepath.Base(path))
		}
		return nil, fmt.Errorf("supervisor: lock: %w", err)
	}
	f.Truncate(0)
	f.WriteAt([]byte(strconv.Itoa(os.Getpid())), 0)
	return &Lock{f: f}, nil
}

// Unlock releases the lock.
func (l *Lock) Unlock() {
	if l != nil && l.f != nil {
		syscall.Flock(int(l.f.Fd()), syscall.LOCK_UN)
		l.f.Close()
	}
}
