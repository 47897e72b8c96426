package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"time"

	"github.com/google/shlex"
	"github.com/urfave/cli/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/nnguard/nnguard/logparse"
	"github.com/nnguard/nnguard/nnunet"
	"github.com/nnguard/nnguard/policy"
	"github.com/nnguard/nnguard/supervisor"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// exitError carries an exit code through urfave/cli to the one place that
// turns errors into exit codes (run).
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

func exitWith(code int, err error) error { return &exitError{code: code, err: err} }

// run builds the application and maps its error to an exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	var log *zap.Logger
	app := newApp(stdout, stderr, &log)
	err := app.RunContext(ctx, args)
	if log != nil {
		log.Sync()
	}
	return exitCode(err, stderr)
}

// exitCode is the one switch from errors to exit codes.
func exitCode(err error, stderr io.Writer) int {
	if err == nil {
		return 0
	}
	var ee *exitError
	if errors.As(err, &ee) {
		if ee.err != nil && ee.code != 0 && ee.err.Error() != "" {
			fmt.Fprintln(stderr, "nnguard:", ee.err)
		}
		return ee.code
	}
	if errors.Is(err, nnunet.ErrConfig) {
		fmt.Fprintln(stderr, "nnguard:", err)
		return supervisor.ExitUsage
	}
	// urfave/cli usage errors (unknown flag, bad value) land here.
	fmt.Fprintln(stderr, "nnguard:", err)
	return supervisor.ExitUsage
}

func newLogger(format, level string, w io.Writer) (*zap.Logger, error) {
	var lvl zapcore.Level
	if err := lvl.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("bad --log-level %q (debug, info, warn, error)", level)
	}
	encCfg := zap.NewProductionEncoderConfig()
	encCfg.TimeKey = "time"
	encCfg.EncodeTime = zapcore.ISO8601TimeEncoder
	var enc zapcore.Encoder
	switch format {
	case "json":
		enc = zapcore.NewJSONEncoder(encCfg)
	case "console":
		encCfg.EncodeLevel = zapcore.CapitalLevelEncoder
		enc = zapcore.NewConsoleEncoder(encCfg)
	default:
		return nil, fmt.Errorf("bad --log-format %q (console or json)", format)
	}
	return zap.New(zapcore.NewCore(enc, zapcore.AddSync(w), lvl)), nil
}

const trainUsage = `nnguard [global options] train [options] DATASET CONFIGURATION FOLD [nnUNetv2_train options]`

func newApp(stdout, stderr io.Writer, logp **zap.Logger) *cli.App {
	var logFormat, logLevel string
	app := &cli.App{
		Name:  "nnguard",
		Usage: "supervise nnU-Net v2 training: diagnose failures, adapt, resume from the checkpoint",
		Description: `nnguard replaces a direct nnUNetv2_train call. It runs the trainer, mirrors and records
its output, and when the run dies (CUDA out of memory, dead data-augmentation workers, a
stall, ...) it names the root cause, adapts (a lower batch size through a derived plans
file, fewer workers, allocator settings, waiting for a busy GPU) and resumes from the
newest valid checkpoint with --c, until the fold is trained or it gives up with a reason.

  nnguard train 4 3d_fullres 0            # instead of: nnUNetv2_train 4 3d_fullres 0
  nnguard classify slurm-1234.out         # what went wrong in a saved log?
  nnguard doctor                          # check GPU, environment and versions first

Exit codes: 0 trained (or already complete), 2 usage or configuration error, 3 gave up,
4 nnguard failed, 5 GPU fault (requeue elsewhere), 130/143 interrupted (SIGINT/SIGTERM).`,
		Writer:          stdout,
		ErrWriter:       stderr,
		HideHelpCommand: true,
		ExitErrHandler:  func(*cli.Context, error) {}, // never os.Exit inside; run maps errors
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "log-format", Value: "console", Usage: "nnguard's own log on stderr: console or json", EnvVars: []string{"NNGUARD_LOG_FORMAT"}, Destination: &logFormat},
			&cli.StringFlag{Name: "log-level", Value: "warn", Usage: "debug, info, warn or error", EnvVars: []string{"NNGUARD_LOG_LEVEL"}, Destination: &logLevel},
		},
		Before: func(c *cli.Context) error {
			l, err := newLogger(logFormat, logLevel, stderr)
			if err != nil {
				return exitWith(supervisor.ExitUsage, err)
			}
			*logp = l
			return nil
		},
		Commands: []*cli.Command{
			trainCommand(stdout, logp),
			classifyCommand(stdout),
			doctorCommand(stdout, logp),
			{
				Name:  "version",
				Usage: "print nnguard's version",
				Action: func(c *cli.Context) error {
					fmt.Fprintln(stdout, "nnguard", version)
					return nil
				},
			},
		},
	}
	return app
}

func trainCommand(stdout io.Writer, logp **zap.Logger) *cli.Command {
	var o struct {
		trainerCmd                           string
		maxRestarts, minBatch, minWorkers    int
		grace, killAfter, backoff            time.Duration
		stallFactor                          float64
		stallTimeout, firstEpoch, waitForGPU time.Duration
		gpu, simGPU                          string
		sampleInterval                       time.Duration
	}
	return &cli.Command{
		Name:      "train",
		Usage:     "run nnUNetv2_train under supervision until the fold is trained",
		UsageText: trainUsage,
		Description: `Everything after FOLD goes to nnUNetv2_train unchanged, except what nnguard manages on
restarts: it adds --c (resume), drops -pretrained_weights and sets -p to a derived plans
file when it lowered the batch size. nnguard's own options go before DATASET.

Records: <fold>/nnguard/console.log (the trainer's output), events.jsonl (one JSON event
per line), state.json (settings in force; running the same command again continues).`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "trainer-cmd", Value: "nnUNetv2_train", Usage: "trainer command, split like a shell would (e.g. \"python3 sim/nnunetv2_train.py\")", EnvVars: []string{"NNGUARD_TRAINER_CMD"}, Destination: &o.trainerCmd},
			&cli.IntFlag{Name: "max-restarts", Value: 10, Usage: "restarts allowed in this run", EnvVars: []string{"NNGUARD_MAX_RESTARTS"}, Destination: &o.maxRestarts},
			&cli.IntFlag{Name: "min-batch-size", Value: 2, Usage: "never lower the batch size below this (1 disables nnU-Net's foreground oversampling)", EnvVars: []string{"NNGUARD_MIN_BATCH_SIZE"}, Destination: &o.minBatch},
			&cli.IntFlag{Name: "min-workers", Value: 1, Usage: "never lower nnUNet_n_proc_DA below this", EnvVars: []string{"NNGUARD_MIN_WORKERS"}, Destination: &o.minWorkers},
			&cli.DurationFlag{Name: "grace", Value: 30 * time.Second, Usage: "how long a trainer that printed a fatal error may take to exit by itself", EnvVars: []string{"NNGUARD_GRACE"}, Destination: &o.grace},
			&cli.DurationFlag{Name: "kill-after", Value: 10 * time.Second, Usage: "time between SIGTERM and SIGKILL to the trainer's process group", EnvVars: []string{"NNGUARD_KILL_AFTER"}, Destination: &o.killAfter},
			&cli.DurationFlag{Name: "backoff", Value: 10 * time.Second, Usage: "pause between attempts", EnvVars: []string{"NNGUARD_BACKOFF"}, Destination: &o.backoff},
			&cli.Float64Flag{Name: "stall-factor", Value: 3, Usage: "a stall is no new epoch for this many times the longest recent epoch", EnvVars: []string{"NNGUARD_STALL_FACTOR"}, Destination: &o.stallFactor},
			&cli.DurationFlag{Name: "stall-timeout", Value: 30 * time.Minute, Usage: "minimum silence before a stall is declared", EnvVars: []string{"NNGUARD_STALL_TIMEOUT"}, Destination: &o.stallTimeout},
			&cli.DurationFlag{Name: "first-epoch-timeout", Value: 2 * time.Hour, Usage: "allowance for startup and the first epoch (compilation, unpacking)", EnvVars: []string{"NNGUARD_FIRST_EPOCH_TIMEOUT"}, Destination: &o.firstEpoch},
			&cli.DurationFlag{Name: "wait-for-gpu", Value: 30 * time.Minute, Usage: "at an OOM caused by other processes, wait this long for the GPU to be released", EnvVars: []string{"NNGUARD_WAIT_FOR_GPU"}, Destination: &o.waitForGPU},
			&cli.StringFlag{Name: "gpu", Value: "", Usage: "\"auto\" picks the visible GPU with the most free memory and sets CUDA_VISIBLE_DEVICES", EnvVars: []string{"NNGUARD_GPU"}, Destination: &o.gpu},
			&cli.DurationFlag{Name: "sample-interval", Value: 5 * time.Second, Usage: "GPU memory sampling interval", EnvVars: []string{"NNGUARD_SAMPLE_INTERVAL"}, Destination: &o.sampleInterval},
			&cli.StringFlag{Name: "sim-gpu", Hidden: true, Usage: "read a simulated GPU from this state file (tests, demo)", EnvVars: []string{"NNGUARD_SIM_GPU_STATE"}, Destination: &o.simGPU},
		},
		Action: func(c *cli.Context) error {
			log := (*logp).Named("train")
			argv, err := shlex.Split(o.trainerCmd)
			if err != nil || len(argv) == 0 {
				return exitWith(supervisor.ExitUsage, fmt.Errorf("bad --trainer-cmd %q: %v", o.trainerCmd, err))
			}
			if _, err := exec.LookPath(argv[0]); err != nil {
				return exitWith(supervisor.ExitUsage, fmt.Errorf("trainer command %q not found (is nnU-Net installed in this environment? set --trainer-cmd or NNGUARD_TRAINER_CMD): %v", argv[0], err))
			}
			if c.NArg() < 3 {
				return exitWith(supervisor.ExitUsage, fmt.Errorf("usage: %s", trainUsage))
			}
			if o.minBatch < 1 || o.minWorkers < 0 || o.maxRestarts < 0 {
				return exitWith(supervisor.ExitUsage, errors.New("--min-batch-size must be ≥ 1, --min-workers and --max-restarts ≥ 0"))
			}
			if o.gpu != "" && o.gpu != "auto" {
				return exitWith(supervisor.ExitUsage, fmt.Errorf("bad --gpu %q: only \"auto\" is supported (use CUDA_VISIBLE_DEVICES to choose a GPU)", o.gpu))
			}
			job, err := supervisor.Resolve(c.Args().Slice(), os.Getenv)
			if err != nil {
				return exitWith(supervisor.ExitUsage, err)
			}
			gpu := newGPU(o.simGPU, o.sampleInterval, log, stdout)
			cfg := supervisor.Config{
				TrainerCmd: argv,
				Getenv:     os.Getenv,
				Environ:    os.Environ(),
				Limits: policy.Limits{MaxRestarts: o.maxRestarts, MinBatchSize: o.minBatch, MinWorkers: o.minWorkers,
					UserAllocConf: os.Getenv("PYTORCH_CUDA_ALLOC_CONF") != "", UserCompile: os.Getenv("nnUNet_compile") != ""},
				Grace: o.grace, KillAfter: o.killAfter, Backoff: o.backoff,
				StallFactor: o.stallFactor, StallTimeout: o.stallTimeout, FirstEpoch: o.firstEpoch,
				WaitForGPU: o.waitForGPU, GPUAuto: o.gpu == "auto",
				Stdout: stdout, Log: log, Force: forceStop,
			}
			if job.Args.NumGPUs > cfg.Limits.MinBatchSize {
				// DDP needs at least one sample per GPU (nnU-Net asserts it).
				cfg.Limits.MinBatchSize = job.Args.NumGPUs
			}
			if gpu != nil {
				cfg.GPU = gpu
				defer gpu.Close()
			}
			res := supervisor.Run(c.Context, cfg, job)
			if res.ExitCode != 0 {
				return exitWith(res.ExitCode, errors.New(""))
			}
			return nil
		},
	}
}

type classifyJSON struct {
	File     string              `json:"file"`
	Class    logparse.Class      `json:"class"`
	Action   string              `json:"action"`
	Reason   string              `json:"reason"`
	Advice   string              `json:"advice,omitempty"`
	Evidence []logparse.Evidence `json:"evidence"`
}

// classifyOne diagnoses one saved log (name "-" is stdin) and prints it.
func classifyOne(stdout io.Writer, name string, asJSON bool) error {
	var r io.Reader = os.Stdin
	if name != "-" {
		f, err := os.Open(name)
		if err != nil {
			return fmt.Errorf("classify: %w", err)
		}
		defer f.Close()
		r = f
	}
	d, err := logparse.Classify(r)
	if err != nil {
		return fmt.Errorf("classify %s: %w", name, err)
	}
	dec := policy.Would(d)
	out := classifyJSON{File: name, Class: d.Class, Action: string(dec.Kind), Reason: d.Reason, Evidence: d.Evidence}
	if d.Class != logparse.None {
		out.Advice = dec.Reason
	}
	if out.Evidence == nil {
		out.Evidence = []logparse.Evidence{}
	}
	if out.Reason == "" {
		out.Reason = "no failure found"
	}
	if asJSON {
		b, err := jsonMarshal(out)
		if err != nil {
			return err
		}
		fmt.Fprintln(stdout, string(b))
		return nil
	}
	fmt.Fprintf(stdout, "%s: %s\n  action: %s\n  reason: %s\n", name, out.Class, out.Action, out.Reason)
	if out.Advice != "" {
		fmt.Fprintf(stdout, "  nnguard would: %s\n", out.Advice)
	}
	for _, e := range out.Evidence {
		fmt.Fprintf(stdout, "  %6d: %s\n", e.Line, strings.TrimRight(e.Text, " "))
	}
	return nil
}

func classifyCommand(stdout io.Writer) *cli.Command {
	var asJSON bool
	return &cli.Command{
		Name:      "classify",
		Usage:     "diagnose saved trainer logs without running anything",
		UsageText: "nnguard classify [--json] FILE... (- reads stdin)",
		Description: `Prints the root-cause class, the action nnguard would take, the reason and the
evidence lines with their line numbers. A log without a failure is class "none".
Files of any size are read as a stream.`,
		Flags: []cli.Flag{&cli.BoolFlag{Name: "json", Usage: "one JSON object per file", Destination: &asJSON}},
		Action: func(c *cli.Context) error {
			if c.NArg() == 0 {
				return exitWith(supervisor.ExitUsage, errors.New("usage: nnguard classify [--json] FILE... (- reads stdin)"))
			}
			var failed error
			for _, name := range c.Args().Slice() {
				if err := classifyOne(stdout, name, asJSON); err != nil {
					// report it and go on with the other files
					fmt.Fprintln(c.App.ErrWriter, "nnguard:", err)
					failed = err
				}
			}
			if failed != nil {
				return exitWith(supervisor.ExitUsage, errors.New(""))
			}
			return nil
		},
	}
}
