// Package supervisor runs nnUNetv2_train attempt after attempt: each attempt
// under a pty in its own session, its output mirrored, recorded and parsed;
// after a failure the policy decides, the supervisor applies the decision
// (derived plans, environment), prepares the resume and starts again.
package supervisor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"go.uber.org/zap"

	"github.com/nnguard/nnguard/logparse"
	"github.com/nnguard/nnguard/nnunet"
	"github.com/nnguard/nnguard/policy"
)

// Exit codes of `nnguard train`, part of nnguard's interface.
const (
	ExitOK          = 0
	ExitUsage       = 2 // usage or configuration error before launch
	ExitGaveUp      = 3 // the policy gave up (limits, crash loop, unrecoverable cause)
	ExitFailed      = 4 // nnguard itself could not go on (cannot start the trainer, write its records, ...)
	ExitGPUFault    = 5 // critical GPU fault (Xid): requeue on another node
	ExitInterrupted = 130
	ExitTerminated  = 143
)

// Outcomes of a run (run_end.outcome).
const (
	Completed   = "completed"
	GaveUp      = "gave_up"
	Interrupted = "interrupted"
	Failed      = "failed"
)

// Config is everything a run needs; cmd/nnguard fills it from flags.
type Config struct {
	TrainerCmd []string // the trainer program and its fixed arguments
	Args       []string // DATASET CONFIGURATION FOLD [nnUNetv2_train options]
	Getenv     func(string) string
	Environ    []string // the environment the trainer inherits

	Limits       policy.Limits
	Grace        time.Duration // a trainer that printed a fatal error may take this long to exit
	KillAfter    time.Duration // between SIGTERM and SIGKILL
	Backoff      time.Duration // pause between attempts
	StallFactor  float64
	StallTimeout time.Duration
	FirstEpoch   time.Duration // allowance for the first epoch (compilation, unpacking)
	WaitForGPU   time.Duration // how long to wait for other processes to release the GPU
	GPUAuto      bool

	GPU GPU // may be nil: GPU monitoring off
	// Force, when closed, kills the trainer's group at once (a second
	// SIGINT/SIGTERM to nnguard).
	Force  <-chan struct{}
	Stdout io.Writer
	Log    *zap.Logger
	Now    func() time.Time
	// Tick is the watchdog's period; 0 picks one from StallTimeout.
	Tick time.Duration
}

// Result is how a run ended.
type Result struct {
	Outcome  string
	ExitCode int
	Reason   string
	Attempts int
	FoldDir  string
}

// ErrConfig marks errors that are the user's input (exit 2).
var ErrConfig = nnunet.ErrConfig

// configErrorf is a one-line configuration error wrapping ErrConfig.
func configErrorf(format string, a ...any) error {
	return &cfgError{msg: "supervisor: " + fmt.Sprintf(format, a...)}
}

type cfgError struct{ msg string }

func (e *cfgError) Error() string { return e.msg }
func (e *cfgError) Unwrap() error { return ErrConfig }

// Job is a resolved training job: the dataset, plans and fold folder.
type Job struct {
	Args    nnunet.TrainArgs
	Env     nnunet.Env
	Dataset string // DatasetXXX_Name
	Plans   *nnunet.Plans
	FoldDir string
	Batch   int // batch size in the user's plans
}

// Resolve checks the command line and the nnU-Net files the way nnU-Net
// would, without writing anything. Errors wrap ErrConfig.
func Resolve(args []string, getenv func(string) string) (*Job, error) {
	ta, err := nnunet.ParseTrainArgs(args)
	if err != nil {
		return nil, err
	}
	env, err := nnunet.EnvFrom(getenv)
	if err != nil {
		return nil, err
	}
	tr, err := nnunet.Locate(env, ta)
	if err != nil {
		return nil, err
	}
	bs, err := tr.Plans.BatchSize(ta.Configuration)
	if err != nil {
		return nil, err
	}
	if ta.DisableCheckpointing {
		return nil, configErrorf("--disable_checkpointing leaves nothing to resume from (and no checkpoint_final.pth to tell a finished fold): nnguard cannot supervise such a run; drop the option")
	}
	if ta.ValOnly {
		if fs, _ := nnunet.FoldState(tr.FoldDir); !fs.Final.Valid {
			return nil, configErrorf("--val needs a trained fold, but %s has no valid checkpoint_final.pth", tr.FoldDir)
		}
	}
	return &Job{Args: ta, Env: env, Dataset: filepath.Base(tr.DatasetDir), Plans: tr.Plans, FoldDir: tr.FoldDir, Batch: bs}, nil
}

// Run supervises the job until it is trained or nnguard gives up.
func Run(ctx context.Context, cfg Config, job *Job) (res Result) {
	r := &runner{cfg: cfg, job: job, log: cfg.Log, lastDone: -1, oomKills: newOOMKillCounter()}
	if r.log == nil {
		r.log = zap.NewNop()
	}
	if r.cfg.Now == nil {
		r.cfg.Now = time.Now
	}
	if r.cfg.Stdout == nil {
		r.cfg.Stdout = io.Discard
	}
	return r.run(ctx)
}

type runner struct {
	cfg    Config
	job    *Job
	log    *zap.Logger
	events *Events
	state  *State
	dir    string // <fold>/nnguard
	// lastDone is the highest epoch any attempt of this run completed, -1
	// if none (for the epochs a restart loses).
	lastDone int
	// oomKills reads the cgroup's OOM-kill counter.
	oomKills oomKillCounter
}

func (r *runner) say(format string, a ...any) {
	fmt.Fprintf(r.cfg.Stdout, "\r\n[nnguard] "+format+"\r\n", a...)
}

func (r *runner) statePath() string { return filepath.Join(r.dir, "state.json") }

func (r *runner) fail(err error, attempts int) Result {
	r.log.Error("run failed", zap.Error(err))
	r.say("failed: %v", err)
	if r.events != nil {
		r.events.Emit("run_end", attempts, map[string]any{"outcome": Failed, "exit_code": ExitFailed, "attempts": attempts, "reason": err.Error()})
	}
	return Result{Outcome: Failed, ExitCode: ExitFailed, Reason: err.Error(), Attempts: attempts, FoldDir: r.job.FoldDir}
}

func (r *runner) run(ctx context.Context) Result {
	job := r.job
	st, err := nnunet.FoldState(job.FoldDir)
	if err == nil && st.Complete {
		r.say("fold already complete (%s): nothing to do", job.FoldDir)
		return Result{Outcome: Completed, ExitCode: ExitOK, Reason: "already complete", FoldDir: job.FoldDir}
	}
	r.dir = filepath.Join(job.FoldDir, "nnguard")
	if err := os.MkdirAll(r.dir, 0o755); err != nil {
		// Nothing ran yet: this is the user's setup (an unwritable or
		// broken nnUNet_results), a configuration error.
		err = fmt.Errorf("supervisor: cannot create %s (check that nnUNet_results is writable): %w", r.dir, err)
		r.say("%v", err)
		return Result{Outcome: Failed, ExitCode: ExitUsage, Reason: err.Error(), FoldDir: job.FoldDir}
	}
	lock, err := AcquireLock(filepath.Join(r.dir, "lock"))
	if err != nil {
		r.say("%v", err)
		return Result{Outcome: Failed, ExitCode: ExitUsage, Reason: err.Error(), FoldDir: job.FoldDir}
	}
	defer lock.Unlock()
	r.events, err = OpenEvents(filepath.Join(r.dir, "events.jsonl"), r.cfg.Now)
	if err != nil {
		return r.fail(err, 0)
	}
	defer r.events.Close()
	// We hold the fold's lock, so no nnguard supervises these: trainer
	// processes (often orphaned workers) of an earlier nnguard that was
	// killed. They hold RAM and GPU memory; a second trainer on the same
	// fold would corrupt it.
	if left := MarkedProcesses(job.FoldDir); len(left) > 0 {
		r.say("stopping %d process(es) of an earlier trainer of this fold that outlived its nnguard: %v", len(left), left)
		r.events.Emit("leftovers_stopped", 0, map[string]any{"pids": left})
		if stuck := StopProcesses(left, r.cfg.KillAfter); len(stuck) > 0 {
			return r.fail(fmt.Errorf("supervisor: processes %v of an earlier trainer of this fold survive SIGKILL; refusing to start a second trainer", stuck), 0)
		}
	}

	prev, err := LoadState(r.statePath())
	if err != nil {
		return r.fail(err, 0)
	}
	continuing := prev != nil && prev.Outcome != Completed
	if continuing {
		r.state = prev
		if prev.Outcome == GaveUp {
			// The user runs it again after nnguard gave up, presumably having
			// fixed something: keep the settings, start the crash-loop
			// bookkeeping afresh.
			r.state.Previous = append(r.state.Previous, r.state.History...)
			r.state.History = nil
		}
		r.state.Outcome = ""
		if prev.PlansIdentifier != job.Plans.Identifier || prev.OriginalBatchSize != job.Batch {
			// The user changed the plans (another -p, a replanned or edited
			// file) since: the batch size nnguard chose is stale.
			r.say("the plans changed since the earlier run (%s, batch size %d; now %s, batch size %d): starting again from the new batch size",
				prev.PlansIdentifier, prev.OriginalBatchSize, job.Plans.Identifier, job.Batch)
			r.state.PlansIdentifier, r.state.OriginalBatchSize = job.Plans.Identifier, job.Batch
			r.state.Settings.BatchSize = job.Batch
			r.state.Settings.ExpandableSegments = false
			r.state.DerivedPlans = ""
		}
		r.say("continuing an earlier nnguard run of this fold: batch size %d, nnUNet_n_proc_DA %d, %d attempts so far", r.state.Settings.BatchSize, r.state.Settings.NProcDA, prev.Attempts)
		if r.state.DerivedPlans != "" {
			// rewrite it from the user's plans as they are now
			if err := r.ensurePlans(r.state.Settings.BatchSize); err != nil {
				return r.fail(err, prev.Attempts)
			}
		}
	} else {
		r.state = &State{
			Version: StateVersion, Dataset: job.Dataset, Configuration: job.Args.Configuration, Fold: job.Args.Fold,
			Trainer: trainerName(job.Args), PlansIdentifier: job.Plans.Identifier, OriginalBatchSize: job.Batch,
			Settings: policy.Settings{BatchSize: job.Batch, NProcDA: defaultNProcDA(r.cfg.Getenv)},
		}
		if v := r.cfg.Getenv("nnUNet_def_n_proc"); v != "" {
			fmt.Sscan(v, &r.state.Settings.DefNProc)
		}
	}
	if continuing {
		r.lastDone = r.state.LastDoneEpoch
	} else {
		r.state.LastDoneEpoch = -1
	}
	if job.Args.ValOnly {
		r.state.Settings.ValidationOnly = true // the user asked for --val
	}
	if st.NeedsValidationOnly {
		r.state.Settings.ValidationOnly = true
		r.say("checkpoint_final.pth exists but validation/summary.json does not: running only the validation (--val)")
	}
	if r.cfg.Limits.MinBatchSize == 1 {
		r.say("warning: --min-batch-size=1: at batch size 1 nnU-Net's foreground oversampling disappears (no sample is forced to contain foreground)")
	}
	r.events.Emit("run_start", r.state.Attempts, map[string]any{"fold_dir": job.FoldDir, "continuing": continuing, "settings": r.state.Settings, "pid": os.Getpid()})

	restarts := 0
	waited := false
	for {
		if err := ctx.Err(); err != nil {
			return r.interrupted(ctx, r.state.Attempts, false)
		}
		r.state.Attempts++
		n := r.state.Attempts
		ar, err := r.attempt(ctx, n, continuing || restarts > 0)
		if err != nil {
			return r.fail(err, n)
		}
		r.state.LastDoneEpoch = max(r.state.LastDoneEpoch, r.lastDone)
		if ar.interrupted && !ar.fatal {
			// stopped by nnguard's signal (or the scheduler's, which reached
			// the trainer first): not the trainer's failure
			return r.interrupted(ctx, n, true)
		}
		fs, _ := nnunet.FoldState(job.FoldDir)
		if !ar.interrupted && ar.exit.Code == 0 && ar.exit.Signal == "" && fs.Complete {
			r.state.Outcome = Completed
			r.state.Settings.ValidationOnly = false
			if err := r.state.Save(r.statePath(), r.cfg.Now()); err != nil {
				return r.fail(err, n)
			}
			r.events.Emit("run_end", n, map[string]any{"outcome": Completed, "exit_code": ExitOK, "attempts": n})
			if err := r.events.Err(); err != nil {
				return r.fail(err, n)
			}
			r.say("fold trained: %s (%d attempt(s), batch size %d, nnUNet_n_proc_DA %d)", job.FoldDir, n, r.state.Settings.BatchSize, r.state.Settings.NProcDA)
			return Result{Outcome: Completed, ExitCode: ExitOK, Attempts: n, FoldDir: job.FoldDir}
		}
		d := ar.diag
		if d.Class == logparse.None {
			d.Class = logparse.Unknown
			if ar.exit.Code == 0 && ar.exit.Signal == "" {
				d.Reason = "the trainer exited 0 but the fold is not complete (no checkpoint_final.pth or validation/summary.json)"
			} else {
				d.Reason = "the trainer ended (" + ar.exit.String() + ") without a recognisable error"
			}
		}
		if fs.NeedsValidationOnly && d.Class != logparse.ValidationExport {
			r.state.Settings.ValidationOnly = true
		}

		// What the GPU looked like decides between the batch size's fault,
		// other processes' (contention) and a broken GPU (Xid).
		facts := policy.GPUFacts{}
		if r.cfg.GPU != nil {
			facts = r.cfg.GPU.Facts(ar.pids, ar.start)
			switch {
			case facts.FatalXid != 0:
				d.Class = logparse.GPUFault
				d.Reason = fmt.Sprintf("the GPU reported critical Xid %d during the attempt", facts.FatalXid)
				d.Evidence = append(d.Evidence, logparse.Evidence{Text: fmt.Sprintf("NVML: Xid %d", facts.FatalXid)})
			case d.Class == logparse.GPUOOM && facts.Known && facts.TotalBytes > 0 &&
				float64(facts.ForeignBytes) >= policy.ContentionShare*float64(facts.TotalBytes) && !waited:
				d.Class = logparse.GPUContention
				d.Reason = fmt.Sprintf("CUDA out of memory while other processes held %d MiB of the GPU's %d MiB", facts.ForeignBytes>>20, facts.TotalBytes>>20)
				d.Evidence = append(d.Evidence, logparse.Evidence{Text: fmt.Sprintf("NVML: other processes hold %d MiB of %d MiB", facts.ForeignBytes>>20, facts.TotalBytes>>20)})
			}
		}
		ev := make([]string, 0, len(d.Evidence))
		for _, e := range d.Evidence {
			ev = append(ev, e.Text)
		}
		ff := map[string]any{"class": d.Class, "reason": d.Reason, "evidence": ev, "evidence_lines": d.Evidence, "epoch": ar.maxEpoch, "file": d.File}
		if ar.gpuRecent != nil {
			ff["gpu_recent"] = ar.gpuRecent
		}
		r.events.Emit("failure", n, ff)
		r.say("attempt %d failed: %s: %s", n, d.Class, d.Reason)

		dec := policy.Decide(policy.Input{
			Diagnosis: d, Epoch: ar.maxEpoch, History: r.state.History, Settings: r.state.Settings,
			Limits: r.cfg.Limits, Restarts: restarts, GPU: facts, WaitedForGPU: waited,
		})
		r.state.History = append(r.state.History, policy.Record{Class: d.Class, Settings: r.state.Settings, Epoch: ar.maxEpoch})
		r.state.LastDecision = &dec
		if dec.Kind == policy.GiveUp {
			code := ExitGaveUp
			if dec.GPUFault {
				code = ExitGPUFault
			}
			r.state.Outcome = GaveUp
			if err := r.state.Save(r.statePath(), r.cfg.Now()); err != nil {
				return r.fail(err, n)
			}
			r.emitAction(n, dec)
			r.events.Emit("run_end", n, map[string]any{"outcome": GaveUp, "exit_code": code, "attempts": n, "reason": dec.Reason})
			r.say("gave up after %d attempt(s): %s", n, dec.Reason)
			if err := r.events.Err(); err != nil {
				return r.fail(err, n)
			}
			return Result{Outcome: GaveUp, ExitCode: code, Reason: dec.Reason, Attempts: n, FoldDir: job.FoldDir}
		}
		// State first: a SIGKILL after this line continues with the new
		// settings; the event log then tells what was decided.
		if err := r.apply(dec); err != nil {
			return r.fail(err, n)
		}
		if err := r.state.Save(r.statePath(), r.cfg.Now()); err != nil {
			return r.fail(err, n)
		}
		r.emitAction(n, dec)
		if err := r.events.Err(); err != nil {
			return r.fail(err, n)
		}
		if ar.interrupted {
			// a fatal error was printed before the signal: its lesson is
			// recorded above; the next run starts from it
			return r.interrupted(ctx, n, true)
		}
		restarts++
		waited = false
		if dec.Kind == policy.WaitForGPU {
			released, err := r.waitForGPU(ctx, n)
			if err != nil {
				return r.interrupted(ctx, n, false)
			}
			waited = !released
		}
		if err := sleepCtx(ctx, r.cfg.Backoff); err != nil {
			return r.interrupted(ctx, n, false)
		}
	}
}

func (r *runner) emitAction(n int, dec policy.Decision) {
	r.events.Emit("action", n, map[string]any{"kind": dec.Kind, "class": dec.Class, "from": jsonValue(dec.From), "to": jsonValue(dec.To), "reason": dec.Reason, "settings": dec.Next})
	r.say("%s: %s", dec.Kind, dec.Reason)
}

func (r *runner) interrupted(ctx context.Context, n int, trainerStopped bool) Result {
	code := ExitInterrupted
	sig := "SIGINT"
	if errors.Is(context.Cause(ctx), ErrTerminated) {
		code, sig = ExitTerminated, "SIGTERM"
	}
	r.state.Save(r.statePath(), r.cfg.Now())
	r.events.Emit("run_end", n, map[string]any{"outcome": Interrupted, "exit_code": code, "attempts": n, "signal": sig})
	what := "no trainer was running"
	if trainerStopped {
		what = "the trainer's process group was stopped"
	}
	r.say("interrupted by %s: %s; run the same command again to continue", sig, what)
	return Result{Outcome: Interrupted, ExitCode: code, Reason: "interrupted by " + sig, Attempts: n, FoldDir: r.job.FoldDir}
}

// ErrTerminated is the context cause cmd/nnguard sets on SIGTERM (SIGINT
// otherwise), so the run exits 143 rather than 130.
var ErrTerminated = errors.New("terminated")

// apply makes the decision's settings real: a derived plans file for a
// lower batch size.
func (r *runner) apply(dec policy.Decision) error {
	next := dec.Next
	if next.BatchSize != r.state.Settings.BatchSize {
		if err := r.ensurePlans(next.BatchSize); err != nil {
			return err
		}
	}
	r.state.Settings = next
	return nil
}

// ensurePlans writes (or rewrites) the derived plans file for a batch size.
func (r *runner) ensurePlans(bs int) error {
	if bs == r.state.OriginalBatchSize {
		r.state.DerivedPlans = ""
		return nil
	}
	id := nnunet.DerivedIdentifier(r.job.Plans.Identifier, r.job.Args.Configuration, r.job.Args.Fold, bs)
	path, err := r.job.Plans.Derive(r.job.Args.Configuration, bs, id)
	if errors.Is(err, fs.ErrPermission) || errors.Is(err, syscall.EROFS) {
		// A read-only nnUNet_preprocessed (a shared dataset): keep the
		// derived plans with the fold's records and give -p its absolute
		// path (nnU-Net joins -p onto the dataset folder with os.path.join).
		dir := filepath.Join(r.dir, "plans")
		if mkErr := os.MkdirAll(dir, 0o755); mkErr == nil {
			if path, err = r.job.Plans.DeriveIn(dir, r.job.Args.Configuration, bs, id); err == nil {
				id = strings.TrimSuffix(path, ".json")
				r.say("the plans folder is read-only: the derived plans are in %s", path)
			}
		}
	}
	if err != nil {
		return fmt.Errorf("supervisor: derive plans: %w", err)
	}
	if d := filepath.Dir(r.job.Args.Plans); r.job.Args.Plans != "" && d != "." && !filepath.IsAbs(id) {
		// the user's -p names a plans file in another folder (nnU-Net joins
		// it onto the dataset folder): the derived file sits next to it
		id = filepath.Join(d, id)
	}
	r.state.DerivedPlans = id
	r.events.Emit("derived_plans", r.state.Attempts, map[string]any{"path": path, "identifier": id, "batch_size": bs, "plans_name": r.job.Plans.Name})
	return nil
}

// waitForGPU waits (bounded) for other processes to release the GPU and
// reports whether they did.
func (r *runner) waitForGPU(ctx context.Context, n int) (bool, error) {
	if r.cfg.GPU == nil || r.cfg.WaitForGPU <= 0 {
		return false, nil
	}
	r.say("waiting up to %s for other processes to release the GPU", r.cfg.WaitForGPU)
	start := r.cfg.Now()
	r.events.Emit("gpu_wait", n, map[string]any{"max_s": r.cfg.WaitForGPU.Seconds()})
	err := r.cfg.GPU.WaitFree(ctx, r.cfg.WaitForGPU)
	r.events.Emit("gpu_wait_end", n, map[string]any{"waited_s": r.cfg.Now().Sub(start).Seconds(), "released": err == nil})
	if ctx.Err() != nil {
		return false, ctx.Err()
	}
	return err == nil, nil
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	if d <= 0 {
		return ctx.Err()
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func trainerName(a nnunet.TrainArgs) string {
	if a.Trainer == "" {
		return "nnUNetTrainer"
	}
	return a.Trainer
}

// defaultNProcDA is what nnU-Net would use: nnUNet_n_proc_DA if set, else
// min(12, CPUs).
func defaultNProcDA(getenv func(string) string) int {
	if v := getenv("nnUNet_n_proc_DA"); v != "" {
		var n int
		if _, err := fmt.Sscan(v, &n); err == nil && n >= 0 {
			return n
		}
	}
	return min(12, numCPU())
}

// overrideEnv returns environ with the given variables set (replacing
// existing ones), in a stable order.
func overrideEnv(environ []string, set map[string]string) []string {
	out := make([]string, 0, len(environ)+len(set))
	for _, kv := range environ {
		k, _, _ := strings.Cut(kv, "=")
		if _, ok := set[k]; ok {
			continue
		}
		out = append(out, kv)
	}
	keys := make([]string, 0, len(set))
	for k := range set {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		out = append(out, k+"="+set[k])
	}
	return out
}

// jsonValue makes a numeric action value (a batch size, a worker count) a
// JSON number and leaves words ("expandable_segments:True") strings; an
// empty value is null.
func jsonValue(s string) any {
	if s == "" {
		return nil
	}
	if n, err := strconv.Atoi(s); err == nil {
		return n
	}
	return s
}

// derivedPath is the file of the derived plans in force: next to the user's
// plans, or an absolute identifier (read-only plans folder).
func (r *runner) derivedPath() string {
	if filepath.IsAbs(r.state.DerivedPlans) {
		return r.state.DerivedPlans + ".json"
	}
	return filepath.Join(r.job.Env.Preprocessed, r.job.Dataset, r.state.DerivedPlans+".json")
}
