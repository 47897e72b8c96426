package supervisor

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nnguard/nnguard/logparse"
)

// fakeWatchdog has a controllable clock and CPU counter.
type fakeWatchdog struct {
	*watchdog
	now   time.Time
	ticks uint64
}

func newFakeWatchdog(t *testing.T, timeout, first time.Duration) *fakeWatchdog {
	t.Helper()
	f := &fakeWatchdog{now: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}
	cfg := Config{StallFactor: 3, StallTimeout: timeout, FirstEpoch: first, Now: func() time.Time { return f.now }}
	f.watchdog = newWatchdog(cfg, t.TempDir(), 1)
	f.cpuTicks = func(int) uint64 { return f.ticks }
	f.lastCPU = 0
	return f
}

func (f *fakeWatchdog) advance(d time.Duration, cpuShare float64) {
	f.now = f.now.Add(d)
	f.ticks += uint64(cpuShare * d.Seconds() * clkTck)
}

func (f *fakeWatchdog) epoch(n int, took time.Duration) {
	f.advance(took, 1)
	f.progress(logparse.Event{Kind: logparse.EpochStart, Epoch: n}, f.now)
}

func TestWatchdogFirstEpochGetsItsAllowance(t *testing.T) {
	f := newFakeWatchdog(t, time.Minute, 10*time.Minute)
	f.advance(9*time.Minute, 0)
	if why := f.check(f.now); why != "" {
		t.Fatalf("stalled during the first-epoch allowance: %s", why)
	}
	f.advance(2*time.Minute, 0)
	if why := f.check(f.now); !strings.Contains(why, "before the first epoch") {
		t.Fatalf("want a startup stall, got %q", why)
	}
}

func TestWatchdogSilentIdleTreeIsStalled(t *testing.T) {
	f := newFakeWatchdog(t, time.Minute, time.Hour)
	for e := 0; e < 4; e++ {
		f.epoch(e, 30*time.Second)
	}
	// allowance = max(1 min, 3 × 30 s) = 1m30s
	f.advance(80*time.Second, 0)
	if why := f.check(f.now); why != "" {
		t.Fatalf("stalled within the allowance: %s", why)
	}
	f.advance(20*time.Second, 0)
	why := f.check(f.now)
	if !strings.Contains(why, "in training") || !strings.Contains(why, "allowance 1m30s") {
		t.Fatalf("got %q", why)
	}
}

func TestWatchdogComputingTreeIsSlowNotStalled(t *testing.T) {
	f := newFakeWatchdog(t, time.Minute, time.Hour)
	f.epoch(0, 30*time.Second)
	f.epoch(1, 30*time.Second)
	f.advance(2*time.Minute, 0.9) // silent but busy
	if why := f.check(f.now); why != "" {
		t.Fatalf("a computing tree was called stalled: %s", why)
	}
	f.advance(3*time.Minute, 0.9) // beyond 3 × allowance: stuck in a loop
	if why := f.check(f.now); why == "" {
		t.Fatal("a tree busy for 3× the allowance without progress must count as stalled")
	}
}

func TestWatchdogWorkerDeathDoesNotLookLikeCPU(t *testing.T) {
	f := newFakeWatchdog(t, time.Minute, time.Hour)
	f.epoch(0, 30*time.Second)
	f.epoch(1, 30*time.Second)
	f.ticks = 10000
	f.lastCPU = 10000
	f.advance(30*time.Second, 0)
	f.ticks = 4000 // a worker ended and took its CPU time with it
	f.advance(70*time.Second, 0)
	why := f.check(f.now)
	if why == "" || strings.Contains(why, "e+") || len(why) > 200 {
		t.Fatalf("want a stall with a sane CPU share, got %q", why)
	}
}

func TestWatchdogTrainingLogGrowthIsProgress(t *testing.T) {
	f := newFakeWatchdog(t, time.Minute, time.Hour)
	f.epoch(0, 30*time.Second)
	f.epoch(1, 30*time.Second)
	log := filepath.Join(f.foldDir, "training_log_2026_1_1_00_00_00.txt")
	for i := 0; i < 5; i++ {
		f.advance(80*time.Second, 0)
		os.WriteFile(log, []byte(strings.Repeat("x", i+1)), 0o644) // stdout goes elsewhere, the log grows
		if why := f.check(f.now); why != "" {
			t.Fatalf("log growth ignored: %s", why)
		}
	}
}

func TestWatchdogValidationIsJudgedPerCase(t *testing.T) {
	f := newFakeWatchdog(t, time.Minute, time.Hour)
	f.epoch(0, 5*time.Minute)
	f.advance(time.Second, 1)
	f.progress(logparse.Event{Kind: logparse.TrainingDone}, f.now)
	for i := 0; i < 3; i++ {
		f.advance(10*time.Second, 1)
		f.progress(logparse.Event{Kind: logparse.ValidationCase, Text: "case"}, f.now)
	}
	// cases take 10 s: the allowance is the 1 min floor, not 3 × the 5 min epoch
	f.advance(61*time.Second, 0)
	if why := f.check(f.now); !strings.Contains(why, "final validation") {
		t.Fatalf("got %q", why)
	}
}
