// Command nnguard supervises nnU-Net v2 training: it runs nnUNetv2_train,
// diagnoses failures (GPU out of memory, dead data-augmentation workers,
// stalls, ...), adapts the settings and resumes from the newest checkpoint.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/nnguard/nnguard/supervisor"
)

// forceStop is closed on the second SIGINT/SIGTERM: kill the trainer's
// group at once instead of waiting for its grace.
var forceStop = make(chan struct{})

func main() {
	ctx, cancel := context.WithCancelCause(context.Background())
	sigs := make(chan os.Signal, 2)
	// SIGHUP (a dropped ssh session) stops the run like SIGTERM; the trainer
	// has its own terminal and would otherwise die without its grace.
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	// A closed stdout pipe must not kill nnguard mid-run: writes fail instead.
	signal.Ignore(syscall.SIGPIPE)
	go func() {
		n := 0
		for s := range sigs {
			n++
			if n == 2 {
				close(forceStop)
			}
			if s == syscall.SIGINT {
				cancel(context.Canceled)
			} else {
				cancel(supervisor.ErrTerminated)
			}
		}
	}()
	// Workers orphaned by a dead trainer re-parent to nnguard, which reaps
	// them; without it they would wait for PID 1.
	_ = supervisor.BecomeSubreaper()
	os.Exit(run(ctx, os.Args, os.Stdout, os.Stderr))
}
