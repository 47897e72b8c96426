package supervisor

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/nnguard/nnguard/logparse"
)

// clkTck is the kernel's USER_HZ, the unit of utime/stime in /proc/<pid>/stat
// (100 on every Linux architecture nnguard runs on).
const clkTck = 100

// idleCPUShare: a silent process tree that used less than this share of one
// core since its last progress is stuck; more means it computes (slow).
const idleCPUShare = 0.05

// hardStallFactor: even a tree that computes is stalled after this many
// allowances without progress (a busy loop that never finishes an epoch).
const hardStallFactor = 3

// watchdog judges whether the trainer still makes progress. Progress is a new
// epoch, an epoch end, a validation case, or growth of the newest
// training_log_*.txt (nnU-Net writes epochs there even when stdout goes
// elsewhere). A stall needs both silence longer than the allowance and no
// CPU use by the process tree.
type watchdog struct {
	factor    float64
	timeout   time.Duration
	first     time.Duration
	foldDir   string
	pgid      int
	cpuTicks  func(pgid int) uint64
	phase     int // 0 startup, 1 training, 2 validation
	last      time.Time
	lastCPU   uint64
	lastStart time.Time       // wall time of the last epoch start / validation case
	recent    []time.Duration // wall time of recent epochs (or cases in validation)
	logSize   int64
	logName   string
}

const (
	phaseStartup = iota
	phaseTraining
	phaseValidation
)

func newWatchdog(cfg Config, foldDir string, pgid int) *watchdog {
	w := &watchdog{factor: cfg.StallFactor, timeout: cfg.StallTimeout, first: cfg.FirstEpoch,
		foldDir: foldDir, pgid: pgid, cpuTicks: GroupCPUTicks, last: cfg.Now()}
	if w.factor <= 0 {
		w.factor = 3
	}
	if w.first < w.timeout {
		w.first = w.timeout
	}
	w.lastCPU = w.cpuTicks(pgid)
	w.logName, w.logSize = newestTrainingLog(foldDir)
	return w
}

func (w *watchdog) touch(now time.Time) {
	w.last = now
	w.lastCPU = w.cpuTicks(w.pgid)
}

func (w *watchdog) progress(ev logparse.Event, now time.Time) {
	switch ev.Kind {
	case logparse.EpochStart, logparse.ValidationCase:
		if ev.Kind == logparse.ValidationCase && w.phase != phaseValidation {
			w.phase = phaseValidation
			w.recent = nil
			w.lastStart = time.Time{}
		}
		if ev.Kind == logparse.EpochStart {
			w.phase = phaseTraining
		}
		if !w.lastStart.IsZero() {
			w.recent = append(w.recent, now.Sub(w.lastStart))
			if len(w.recent) > 5 {
				w.recent = w.recent[1:]
			}
		}
		w.lastStart = now
		w.touch(now)
	case logparse.EpochEnd, logparse.NewBest, logparse.ValidationDone:
		w.touch(now)
	case logparse.TrainingDone:
		w.phase = phaseValidation
		w.recent = nil
		w.lastStart = now
		w.touch(now)
	}
}

// allowance is how long the trainer may be silent in its current phase.
func (w *watchdog) allowance() time.Duration {
	longest := time.Duration(0)
	for _, d := range w.recent {
		longest = max(longest, d)
	}
	a := max(w.timeout, time.Duration(w.factor*float64(longest)))
	if w.phase == phaseStartup || (w.phase == phaseTraining && len(w.recent) == 0) {
		a = max(a, w.first)
	}
	return a
}

// check returns a reason when the trainer is stalled, "" otherwise.
func (w *watchdog) check(now time.Time) string {
	if name, size := newestTrainingLog(w.foldDir); name != w.logName || size != w.logSize {
		w.logName, w.logSize = name, size
		w.touch(now)
		return ""
	}
	silent := now.Sub(w.last)
	a := w.allowance()
	if silent <= a {
		return ""
	}
	cpuNow := w.cpuTicks(w.pgid)
	if cpuNow < w.lastCPU {
		// a process of the tree ended and took its CPU time with it:
		// measure from here on
		w.lastCPU = cpuNow
	}
	cpu := cpuNow - w.lastCPU
	share := float64(cpu) / clkTck / silent.Seconds()
	where := "in training"
	switch w.phase {
	case phaseStartup:
		where = "before the first epoch"
	case phaseValidation:
		where = "in the final validation"
	}
	if share >= idleCPUShare && silent <= hardStallFactor*a {
		return "" // silent but computing: slow, not stuck
	}
	return fmt.Sprintf("no progress %s for %s (allowance %s) while the process tree used %.0f%% of a core", where, silent.Round(time.Second), a.Round(time.Second), share*100)
}

// newestTrainingLog returns the newest training_log_*.txt in dir and its size.
func newestTrainingLog(dir string) (string, int64) {
	matches, _ := filepath.Glob(filepath.Join(dir, "training_log_*.txt"))
	var best string
	var bestT time.Time
	var size int64
	for _, m := range matches {
		st, err := os.Stat(m)
		if err != nil {
			continue
		}
		if best == "" || st.ModTime().After(bestT) {
			best, bestT, size = m, st.ModTime(), st.Size()
		}
	}
	return best, size
}
