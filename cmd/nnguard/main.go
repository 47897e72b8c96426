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

func main() {
	ctx, cancel := context.WithCancelCause(context.Background())
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	go func() {
		for s := range sigs {
			if s == syscall.SIGTERM {
				cancel(supervisor.ErrTerminated)
			} else {
				cancel(context.Canceled)
			}
		}
	}()
	os.Exit(run(ctx, os.Args, os.Stdout, os.Stderr))
}
