package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/nnguard/nnguard/nvml"
	"github.com/nnguard/nnguard/policy"
	"github.com/nnguard/nnguard/supervisor"
)

// gpuMonitor adapts the nvml package to supervisor.GPU: preflight, live
// sampling of the trainer's memory, the GPU facts at a failure, and waiting
// for a busy GPU.
type gpuMonitor struct {
	r        nvml.Reader
	interval time.Duration
	log      *zap.Logger
	stop     context.CancelFunc // stops the Xid watcher

	mu       sync.Mutex
	sampler  *nvml.Sampler
	cancel   context.CancelFunc
	done     chan struct{}
	treePIDs map[int]bool // every pid seen in the trainer's group this attempt
	lastPeak uint64       // the trainer's peak memory in the last attempt that had one
	visible  string       // CUDA_VISIBLE_DEVICES nnguard set ("" = the user's)
	auto     bool         // --gpu auto: nnguard picks (and may move to) a GPU
}

var _ supervisor.GPU = (*gpuMonitor)(nil)

// newGPU opens the GPU source: a simulated GPU state file when simPath is
// set, else NVML. Without NVML it says once why monitoring is off and
// returns nil; everything else works without it.
func newGPU(simPath string, interval time.Duration, log *zap.Logger, out io.Writer) *gpuMonitor {
	var r nvml.Reader
	stop := func() {}
	if simPath != "" {
		r = nvml.NewSimFile(simPath)
	} else {
		nv, err := nvml.NewSystem()
		if err != nil {
			fmt.Fprintf(out, "[nnguard] %v; training is supervised from its output only\n", gpuOffReason(err))
			log.Info("nvml unavailable", zap.Error(err))
			return nil
		}
		ctx, cancel := context.WithCancel(context.Background())
		if err := nv.WatchXids(ctx); err != nil {
			log.Info("xid events unavailable", zap.Error(err))
		}
		r, stop = nv, cancel
	}
	if interval <= 0 {
		interval = 5 * time.Second
	}
	return &gpuMonitor{r: r, interval: interval, log: log.Named("gpu"), stop: stop}
}

func gpuOffReason(err error) string {
	if errors.Is(err, nvml.ErrUnavailable) {
		return err.Error()
	}
	return "nvml: " + err.Error()
}

func (g *gpuMonitor) Close() {
	g.stop()
	g.r.Close()
}

func (g *gpuMonitor) devices() ([]nvml.Device, []int) {
	devs, err := g.r.Devices()
	if err != nil || len(devs) == 0 {
		return devs, nil
	}
	vis := os.Getenv("CUDA_VISIBLE_DEVICES")
	if g.visible != "" {
		vis = g.visible
	}
	idx, err := nvml.Visible(devs, vis)
	if err != nil {
		return devs, nil
	}
	return devs, idx
}

func (g *gpuMonitor) Preflight(auto bool) ([]string, string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	devs, err := g.r.Devices()
	if err != nil || len(devs) == 0 {
		return []string{fmt.Sprintf("GPU preflight: cannot read devices: %v", err)}, ""
	}
	var set string
	g.auto = auto
	if auto {
		i, err := nvml.Pick(devs, os.Getenv("CUDA_VISIBLE_DEVICES"))
		if err == nil {
			for _, d := range devs {
				if d.Index == i {
					set = d.UUID
					if set == "" {
						set = strconv.Itoa(i)
					}
				}
			}
			g.visible = set
		}
	}
	_, idx := g.devices()
	var lines []string
	for _, p := range idx {
		d := devs[p]
		lines = append(lines, fmt.Sprintf("GPU %d %s: %d MiB free of %d MiB", d.Index, d.Name, d.FreeBytes>>20, d.TotalBytes>>20))
		procs, _ := g.r.Processes(d.Index)
		for _, pr := range procs {
			lines = append(lines, fmt.Sprintf("  other process on GPU %d: pid %d %s, %d MiB", d.Index, pr.PID, pr.Name, pr.UsedBytes>>20))
		}
		if g.lastPeak > 0 && d.FreeBytes < g.lastPeak {
			lines = append(lines, fmt.Sprintf("  warning: %d MiB free is less than the %d MiB the last attempt peaked at", d.FreeBytes>>20, g.lastPeak>>20))
		}
	}
	return lines, set
}

func (g *gpuMonitor) Begin(pgid int) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.treePIDs = map[int]bool{pgid: true}
	_, idx := g.devices()
	devs, _ := g.r.Devices()
	var devIdx []int
	for _, p := range idx {
		devIdx = append(devIdx, devs[p].Index)
	}
	pids := func() []int {
		m := supervisor.GroupMembers(pgid)
		g.mu.Lock()
		for _, p := range m {
			g.treePIDs[p] = true
		}
		g.mu.Unlock()
		return m
	}
	g.sampler = nvml.NewSampler(g.r, g.interval, devIdx, pids, nil)
	ctx, cancel := context.WithCancel(context.Background())
	g.cancel = cancel
	g.done = make(chan struct{})
	go func(s *nvml.Sampler, done chan struct{}) { defer close(done); s.Run(ctx) }(g.sampler, g.done)
}

func (g *gpuMonitor) Latest() (map[string]any, bool) {
	g.mu.Lock()
	s := g.sampler
	g.mu.Unlock()
	if s == nil {
		return nil, false
	}
	rec := s.Recent()
	if len(rec) == 0 {
		return nil, false
	}
	l := rec[len(rec)-1]
	return map[string]any{"device": l.Device, "used_mib": l.UsedBytes >> 20, "total_mib": l.TotalBytes >> 20, "tree_mib": l.TreeBytes >> 20, "tree_from_device": l.TreeFromDevice}, true
}

func (g *gpuMonitor) End() map[string]any {
	g.mu.Lock()
	s, cancel, done := g.sampler, g.cancel, g.done
	g.mu.Unlock()
	if s == nil {
		return nil
	}
	cancel()
	<-done
	peak, ok := s.Peak()
	if !ok {
		return map[string]any{"samples": 0}
	}
	g.mu.Lock()
	g.lastPeak = peak.TreeBytes
	g.mu.Unlock()
	recent := s.Recent()
	if len(recent) > 8 {
		recent = recent[len(recent)-8:]
	}
	return map[string]any{"peak_tree_mib": peak.TreeBytes >> 20, "peak_device_used_mib": peak.UsedBytes >> 20,
		"peak_time": peak.Time, "tree_from_device": peak.TreeFromDevice, "recent": recent}
}

func (g *gpuMonitor) Facts(_ []int, since time.Time) policy.GPUFacts {
	g.mu.Lock()
	defer g.mu.Unlock()
	f := policy.GPUFacts{Known: true}
	devs, idx := g.devices()
	if len(idx) == 0 {
		return policy.GPUFacts{}
	}
	d := devs[idx[0]]
	if g.auto {
		// another GPU the user allows, free enough for what the trainer
		// needed (or nearly empty when that is not known yet)
		allowed, _ := nvml.Visible(devs, os.Getenv("CUDA_VISIBLE_DEVICES"))
		var best uint64
		for _, p := range allowed {
			o := devs[p]
			need := g.lastPeak
			if need == 0 {
				need = o.TotalBytes * 9 / 10
			}
			if o.Index != d.Index && o.FreeBytes >= need && o.FreeBytes > best {
				f.FreeOther, f.HasFreeOther, best = o.Index, true, o.FreeBytes
			}
		}
	}
	f.TotalBytes = d.TotalBytes
	procs, _ := g.r.Processes(d.Index)
	for _, p := range procs {
		if !g.treePIDs[p.PID] {
			f.ForeignBytes += p.UsedBytes
		}
	}
	if xids, _ := g.r.Xids(since); len(xids) > 0 {
		for _, x := range xids {
			if nvml.IsFatalXid(x.Code) && (x.Device < 0 || x.Device == d.Index) {
				f.FatalXid = x.Code
			}
		}
	}
	return f
}

func (g *gpuMonitor) WaitFree(ctx context.Context, max time.Duration) error {
	deadline := time.NewTimer(max)
	defer deadline.Stop()
	t := time.NewTicker(min(g.interval, time.Second))
	defer t.Stop()
	for {
		f := g.Facts(nil, time.Now())
		if f.TotalBytes == 0 || float64(f.ForeignBytes) < policy.ContentionShare*float64(f.TotalBytes) {
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-deadline.C:
			return fmt.Errorf("gpu: other processes still hold %d MiB after %s", f.ForeignBytes>>20, max)
		case <-t.C:
		}
	}
}
