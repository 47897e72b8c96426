package supervisor

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/nnguard/nnguard/internal/atomicfile"
	"github.com/nnguard/nnguard/logparse"
	"github.com/nnguard/nnguard/nnunet"
	"github.com/nnguard/nnguard/policy"
)

// GPU is what the supervisor needs from the GPU monitor (cmd/nnguard adapts
// the nvml package to it). Implementations must be safe for concurrent use.
type GPU interface {
	// Preflight describes the GPU(s) before an attempt, one line each, and
	// returns the CUDA_VISIBLE_DEVICES value to set ("" = leave as is).
	Preflight(auto bool) (lines []string, visible string)
	// Begin starts sampling for an attempt whose trainer group is pgid.
	Begin(pgid int)
	// End stops sampling and returns the attempt's peak memory and the
	// epoch-independent summary for the event log.
	End() map[string]any
	// Facts returns what the GPU looked like at a failure.
	Facts(pids []int, since time.Time) policy.GPUFacts
	// Latest returns the newest sample of the running attempt.
	Latest() (map[string]any, bool)
	// WaitFree blocks until other processes hold less than the contention
	// share of the GPU, or max passes (error), or ctx ends.
	WaitFree(ctx context.Context, max time.Duration) error
}

type attemptResult struct {
	exit        Exit
	diag        logparse.Diagnosis
	maxEpoch    int // highest epoch started, -1 if none
	doneEpoch   int // highest epoch completed ("Epoch time"), -1 if none
	start       time.Time
	pids        []int
	interrupted bool
	stalled     bool
	fatal       bool // the trainer printed a fatal error
	gpuRecent   any  // the last GPU samples, for the failure report
}

// gpuSampleLogEvery is how often a GPU sample goes to the event log.
const gpuSampleLogEvery = time.Minute

// lineSink receives the trainer's bytes in the pty reader goroutine, splits
// them into lines and parses them; events go to the attempt loop.
type lineSink struct {
	mu     sync.Mutex
	split  *logparse.Splitter
	parser *logparse.Parser
	events chan logparse.Event
	// fatal keeps the first Fatal event even when the channel was full, so
	// the grace timer always starts.
	fatal *logparse.Event
}

func newLineSink() *lineSink {
	s := &lineSink{parser: logparse.NewParser(), events: make(chan logparse.Event, 1024)}
	s.split = logparse.NewSplitter(64<<10, func(line []byte) {
		for _, ev := range s.parser.Feed(string(line)) {
			if ev.Kind == logparse.Fatal && s.fatal == nil {
				f := ev
				s.fatal = &f
			}
			select {
			case s.events <- ev:
			default: // the loop only needs recent progress; never block the reader
			}
		}
	})
	return s
}

func (s *lineSink) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.split.Write(p)
}

// fatalSeen returns the first Fatal event, if any.
func (s *lineSink) fatalSeen() *logparse.Event {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.fatal
}

// bestEffort writes to w and ignores its errors after saying so once: a
// full disk or a closed pipe on nnguard's own stdout must not stop the
// console log or the parser.
type bestEffort struct {
	w      io.Writer
	failed bool
	log    func(error)
}

func (b *bestEffort) Write(p []byte) (int, error) {
	if !b.failed {
		if _, err := b.w.Write(p); err != nil {
			b.failed = true
			b.log(err)
		}
	}
	return len(p), nil
}

func (s *lineSink) finish(exit logparse.Exit) logparse.Diagnosis {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.split.Flush()
	return s.parser.Diagnose(exit)
}

func (r *runner) attempt(ctx context.Context, n int, resume bool) (attemptResult, error) {
	job := r.job
	ar := attemptResult{maxEpoch: -1, doneEpoch: -1}
	set := r.state.Settings

	// Make --c pick the newest valid checkpoint; record what it resumes from.
	var rp nnunet.ResumePlan
	if !set.ValidationOnly {
		var err error
		rp, err = nnunet.PrepareResume(job.FoldDir, r.cfg.Now())
		if err != nil {
			return ar, fmt.Errorf("supervisor: prepare resume: %w", err)
		}
		for _, w := range rp.Warnings {
			r.say("warning: %s", w)
			r.events.Emit("resume_warning", n, map[string]any{"warning": w})
		}
		if len(rp.Backups) > 0 {
			r.events.Emit("checkpoint_backup", n, map[string]any{"files": rp.Backups, "why": "copies kept before nnguard changed checkpoint files"})
		}
		for _, m := range rp.Moves {
			r.events.Emit("checkpoint_moved", n, map[string]any{"from": m.From, "to": m.To, "why": m.Why, "copy": m.Copy})
			verb := "moved %s aside to %s (%s)"
			if m.Copy {
				verb = "copied %s to %s (%s)"
			}
			r.say(verb, filepath.Base(m.From), filepath.Base(m.To), m.Why)
		}
	}
	if set.BatchSize != r.state.OriginalBatchSize && r.state.DerivedPlans == "" || r.state.DerivedPlans != "" && !fileExists(r.derivedPath()) {
		if err := r.ensurePlans(set.BatchSize); err != nil {
			return ar, err
		}
	}
	cont := (resume || job.Args.Continue) && rp.HasCheckpoint
	if !cont && !set.ValidationOnly && rp.HasCheckpoint {
		// A fresh start in a folder with checkpoints: nnU-Net overwrites
		// checkpoint_best.pth after its first epoch. Keep copies first.
		if err := r.backupBeforeFreshStart(n); err != nil {
			return ar, err
		}
	}
	argv := append([]string{}, r.cfg.TrainerCmd...)
	argv = append(argv, job.Args.Argv(nnunet.ArgvOptions{
		Plans:          r.state.DerivedPlans,
		Continue:       cont && !set.ValidationOnly,
		DropPretrained: cont,
		ValOnly:        set.ValidationOnly,
	})...)
	over := set.Env()
	if r.cfg.Limits.UserAllocConf {
		delete(over, "PYTORCH_CUDA_ALLOC_CONF")
	}
	over["PYTHONUNBUFFERED"] = "1"
	over[FoldMarker] = job.FoldDir
	if r.cfg.GPU != nil {
		lines, visible := r.cfg.GPU.Preflight(r.cfg.GPUAuto)
		for _, l := range lines {
			r.say("%s", l)
		}
		if visible != "" {
			over["CUDA_VISIBLE_DEVICES"] = visible
		}
		r.events.Emit("preflight", n, map[string]any{"gpu": lines, "cuda_visible_devices": visible})
	}
	if err := r.state.Save(r.statePath(), r.cfg.Now()); err != nil {
		return ar, err
	}
	// Epochs lost: completed by earlier attempts but not in the checkpoint
	// this attempt resumes from.
	lost := 0
	if r.lastDone >= 0 && !set.ValidationOnly {
		lost = max(0, r.lastDone+1-rp.Epoch)
	}
	r.events.Emit("attempt_start", n, map[string]any{
		"argv": argv, "batch_size": set.BatchSize, "n_proc_da": set.NProcDA, "plans_identifier": planID(r.state),
		"env": over, "resume_from": rp.From, "resume_epoch": rp.Epoch, "lost_epochs": lost, "validation_only": set.ValidationOnly,
	})
	r.log.Info("attempt start", zap.Int("attempt", n), zap.Strings("argv", argv), zap.Int("batch_size", set.BatchSize), zap.Int("n_proc_da", set.NProcDA))
	if rp.From != "" {
		r.say("attempt %d: resuming from %s (epoch %d)", n, rp.From, rp.Epoch)
	} else {
		r.say("attempt %d: batch size %d, nnUNet_n_proc_DA %d", n, set.BatchSize, set.NProcDA)
	}

	console, err := os.OpenFile(filepath.Join(r.dir, "console.log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return ar, fmt.Errorf("supervisor: console log: %w", err)
	}
	defer console.Close()
	fmt.Fprintf(console, "\n===== nnguard attempt %d %s: %q =====\n", n, r.cfg.Now().UTC().Format(time.RFC3339), argv)
	sink := newLineSink()
	oomBefore, oomOK := r.oomKills.Count()
	ar.start = r.cfg.Now()
	stdout := &bestEffort{w: r.cfg.Stdout, log: func(err error) {
		r.log.Warn("cannot write the trainer's output to stdout; console.log still has it", zap.Error(err))
	}}
	// the parser and console.log first: they must see every byte
	p, err := Start(Spec{Argv: argv, Env: overrideEnv(r.cfg.Environ, over), Output: io.MultiWriter(sink, console, stdout)})
	if err != nil {
		return ar, err
	}
	if r.cfg.GPU != nil {
		r.cfg.GPU.Begin(p.Pid())
	}
	ar.pids = []int{p.Pid()}

	wd := newWatchdog(r.cfg, job.FoldDir, p.Pid())
	tick := r.cfg.Tick
	if tick <= 0 {
		tick = min(max(r.cfg.StallTimeout/8, 50*time.Millisecond), 5*time.Second)
	}
	ticker := time.NewTicker(tick)
	defer ticker.Stop()
	var graceC <-chan time.Time
	var stopping bool
	stop := func() {
		if stopping {
			return
		}
		stopping = true
		sctx, cancel := context.WithTimeout(context.Background(), r.cfg.KillAfter+30*time.Second)
		go func() { defer cancel(); p.Stop(sctx, r.cfg.KillAfter) }()
	}
	var stallReason string
	ctxDone := ctx.Done()
	force := r.cfg.Force
	startGrace := func(ev logparse.Event) {
		if graceC == nil && !stopping {
			ar.fatal = true
			r.events.Emit("fatal_seen", n, map[string]any{"class": ev.Class, "line": ev.Line, "grace_s": r.cfg.Grace.Seconds()})
			r.say("the trainer printed a fatal error (%s); it has %s to exit by itself", ev.Class, r.cfg.Grace)
			graceC = time.After(r.cfg.Grace)
		}
	}
	effective := 0
	type epochAt struct {
		t time.Time
		e int
	}
	var epochStarts []epochAt
	lastSampleLog := r.cfg.Now()
loop:
	for {
		select {
		case ev := <-sink.events:
			wd.progress(ev, r.cfg.Now())
			switch ev.Kind {
			case logparse.EpochStart:
				ar.maxEpoch = max(ar.maxEpoch, ev.Epoch)
				epochStarts = append(epochStarts, epochAt{r.cfg.Now(), ev.Epoch})
				if len(epochStarts) > 4096 {
					epochStarts = epochStarts[2048:]
				}
			case logparse.EpochEnd:
				ar.doneEpoch = max(ar.doneEpoch, ev.Epoch)
			case logparse.BatchSize:
				effective = ev.BatchSize
				r.state.EffectiveBatchSize = ev.BatchSize
				if ev.BatchSize != set.BatchSize {
					r.say("warning: the trainer runs with batch size %d, nnguard expected %d", ev.BatchSize, set.BatchSize)
				}
				r.events.Emit("batch_size", n, map[string]any{"effective": ev.BatchSize, "expected": set.BatchSize})
			case logparse.Fatal:
				startGrace(ev)
			}
		case <-graceC:
			graceC = nil
			r.say("the trainer printed a fatal error and did not exit within %s: stopping its process group", r.cfg.Grace)
			r.events.Emit("grace_expired", n, nil)
			stop()
		case <-ticker.C:
			if f := sink.fatalSeen(); f != nil && !ar.fatal {
				startGrace(*f) // its event was dropped from a full channel
			}
			if r.cfg.GPU != nil && r.cfg.Now().Sub(lastSampleLog) >= gpuSampleLogEvery {
				lastSampleLog = r.cfg.Now()
				if s, ok := r.cfg.GPU.Latest(); ok {
					s["epoch"] = ar.maxEpoch
					r.events.Emit("gpu_sample", n, s)
				}
			}
			if stopping {
				continue
			}
			if why := wd.check(r.cfg.Now()); why != "" {
				stallReason = why
				r.say("stall: %s: stopping the trainer", why)
				r.events.Emit("stall", n, map[string]any{"reason": why, "epoch": ar.maxEpoch})
				stop()
			}
		case <-ctxDone:
			// keep draining the output until the group is gone
			ctxDone = nil
			ar.interrupted = true
			r.events.Emit("stopping", n, map[string]any{"why": "nnguard received a signal"})
			r.say("stopping the trainer (SIGTERM to its process group, SIGKILL after %s; a second signal kills at once)", r.cfg.KillAfter)
			stop()
		case <-force:
			force = nil
			r.events.Emit("stopping", n, map[string]any{"why": "second signal: SIGKILL"})
			p.Kill()
		case <-p.Done():
			break loop
		}
	}
	// drain the remaining events
	for {
		select {
		case ev := <-sink.events:
			if ev.Kind == logparse.EpochStart {
				ar.maxEpoch = max(ar.maxEpoch, ev.Epoch)
			}
			if ev.Kind == logparse.EpochEnd {
				ar.doneEpoch = max(ar.doneEpoch, ev.Epoch)
			}
			continue
		default:
		}
		break
	}
	ex, werr := p.Exit()
	stuck, escaped := p.Leftovers()
	if ctx.Err() != nil {
		ar.interrupted = true // the signal may have reached the trainer first (Slurm signals the whole job)
	}
	r.lastDone = max(r.lastDone, ar.doneEpoch)
	ar.exit = ex
	ar.diag = sink.finish(logparse.Exit{Known: true, Code: ex.Code, Signal: ex.Signal})
	if oomAfter, ok := r.oomKills.Count(); ok && oomOK && oomAfter > oomBefore {
		// The kernel killed processes of our cgroup for memory during the
		// attempt: a worker (or the trainer) died for host RAM, whatever the
		// text says about the symptom.
		ev := logparse.Evidence{Text: fmt.Sprintf("cgroup memory: oom_kill rose from %d to %d during the attempt", oomBefore, oomAfter)}
		switch ar.diag.Class {
		case logparse.None, logparse.Unknown, logparse.HostOOM:
			ar.diag.Class = logparse.HostOOM
			ar.diag.Reason = "the kernel's OOM killer killed a process of the trainer (host RAM, counted in the cgroup's memory events); lower nnUNet_n_proc_DA or add RAM"
		}
		ar.diag.Evidence = append(ar.diag.Evidence, ev)
		r.events.Emit("cgroup_oom_kill", n, map[string]any{"before": oomBefore, "after": oomAfter})
	}
	if stallReason != "" && (ar.diag.Class == logparse.None || ar.diag.Class == logparse.Unknown) {
		ar.stalled = true
		ar.diag = logparse.Diagnosis{Class: logparse.Stall, Reason: stallReason, Evidence: ar.diag.Evidence}
	}
	var gpu map[string]any
	if r.cfg.GPU != nil {
		gpu = r.cfg.GPU.End()
		if pt, ok := gpu["peak_time"].(time.Time); ok {
			pe := -1
			for _, es := range epochStarts {
				if !es.t.After(pt) {
					pe = es.e
				}
			}
			gpu["peak_epoch"] = pe
		}
		if rec, ok := gpu["recent"]; ok {
			ar.gpuRecent = rec
		}
	}
	// exit_code follows the shell: 128+N when the trainer was killed by
	// signal N (signal then names it), the exit status otherwise.
	var sig any
	code := ex.Code
	if ex.Signal != "" {
		sig = ex.Signal
		code = 128 + ex.Number
	}
	end := map[string]any{"exit_code": code, "signal": sig, "duration_s": r.cfg.Now().Sub(ar.start).Seconds(), "epoch": ar.maxEpoch, "epochs_completed_to": ar.doneEpoch, "effective_batch_size": effective}
	if gpu != nil {
		end["gpu"] = gpu
	}
	if werr != nil {
		end["error"] = werr.Error()
	}
	if len(stuck) > 0 {
		end["stuck_pids"] = stuck
		r.say("warning: processes %v of the trainer survived SIGKILL (stuck in the kernel, e.g. the GPU driver)", stuck)
	}
	if len(escaped) > 0 {
		end["escaped_pids"] = escaped
		r.say("processes %v had left the trainer's process group but held its terminal: they were stopped", escaped)
	}
	r.events.Emit("attempt_end", n, end)
	return ar, nil
}

func planID(s *State) string {
	if s.DerivedPlans != "" {
		return s.DerivedPlans
	}
	return s.PlansIdentifier
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

func numCPU() int { return runtime.NumCPU() }

// backupBeforeFreshStart copies the fold's checkpoints into
// nnguard/checkpoint-backups/fresh-start-<time>/ before an attempt that
// starts training anew in a folder that has some.
func (r *runner) backupBeforeFreshStart(n int) error {
	dir := filepath.Join(r.job.FoldDir, filepath.FromSlash(nnunet.BackupDir), "fresh-start-"+r.cfg.Now().UTC().Format("20060102T150405Z"))
	var copied []string
	for _, name := range []string{nnunet.CheckpointFinal, nnunet.CheckpointLatest, nnunet.CheckpointBest} {
		src := filepath.Join(r.job.FoldDir, name)
		if !fileExists(src) {
			continue
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("supervisor: backup: %w", err)
		}
		if err := atomicfile.CopyFile(src, filepath.Join(dir, name)); err != nil {
			return fmt.Errorf("supervisor: backup %s: %w", name, err)
		}
		copied = append(copied, name)
	}
	if len(copied) > 0 {
		r.say("starting a new training in a folder with checkpoints (no --c): copies kept in %s", dir)
		r.events.Emit("checkpoint_backup", n, map[string]any{"dir": dir, "files": copied, "why": "fresh start without --c overwrites checkpoint_best.pth"})
	}
	return nil
}
