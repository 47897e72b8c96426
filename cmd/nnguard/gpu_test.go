package main

import (
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/nnguard/nnguard/nvml"
)

// fakeGPUs is an nvml.Reader over fixed devices and processes.
type fakeGPUs struct {
	devs  []nvml.Device
	procs map[int][]nvml.Process
	xids  []nvml.Xid
}

func (f *fakeGPUs) Devices() ([]nvml.Device, error)          { return f.devs, nil }
func (f *fakeGPUs) Processes(i int) ([]nvml.Process, error)  { return f.procs[i], nil }
func (f *fakeGPUs) Info() (nvml.Info, error)                 { return nvml.Info{}, nil }
func (f *fakeGPUs) Xids(since time.Time) ([]nvml.Xid, error) { return f.xids, nil }
func (f *fakeGPUs) Close() error                             { return nil }

const gib = 1 << 30

func twoGPUs() *fakeGPUs {
	return &fakeGPUs{
		devs: []nvml.Device{
			{Index: 0, UUID: "GPU-aaa", Name: "A", TotalBytes: 24 * gib, UsedBytes: 10 * gib, FreeBytes: 14 * gib},
			{Index: 1, UUID: "GPU-bbb", Name: "B", TotalBytes: 24 * gib, UsedBytes: 0, FreeBytes: 24 * gib},
		},
		procs: map[int][]nvml.Process{0: {{PID: 4242, Name: "other_job", UsedBytes: 10 * gib, Device: 0}}},
	}
}

func TestGPUFactsForeignMemoryAndFreeOther(t *testing.T) {
	t.Setenv("CUDA_VISIBLE_DEVICES", "")
	g := &gpuMonitor{r: twoGPUs(), interval: time.Second, log: zap.NewNop(), stop: func() {}}
	lines, set := g.Preflight(false)
	if set != "" || !strings.Contains(strings.Join(lines, "\n"), "pid 4242 other_job, 10240 MiB") {
		t.Fatalf("preflight %q %q", lines, set)
	}
	// not --gpu auto: no move offered, foreign memory counted
	f := g.Facts(nil, time.Time{})
	if !f.Known || f.ForeignBytes != 10*gib || f.TotalBytes != 24*gib || f.HasFreeOther {
		t.Fatalf("facts %+v", f)
	}
	// --gpu auto picks the emptier GPU and offers it
	g2 := &gpuMonitor{r: twoGPUs(), interval: time.Second, log: zap.NewNop(), stop: func() {}}
	if _, set := g2.Preflight(true); set != "GPU-bbb" {
		t.Fatalf("auto picked %q", set)
	}
	g2.visible = "GPU-aaa" // as if the busy one had been picked before
	f = g2.Facts(nil, time.Time{})
	if !f.HasFreeOther || f.FreeOther != 1 {
		t.Fatalf("facts %+v", f)
	}
}

func TestGPUFactsFatalXid(t *testing.T) {
	t.Setenv("CUDA_VISIBLE_DEVICES", "")
	r := twoGPUs()
	r.xids = []nvml.Xid{{Device: 1, Code: 79}, {Device: 0, Code: 13}, {Device: 0, Code: 48}}
	g := &gpuMonitor{r: r, interval: time.Second, log: zap.NewNop(), stop: func() {}}
	if f := g.Facts(nil, time.Time{}); f.FatalXid != 48 {
		t.Fatalf("want Xid 48 on GPU 0 (13 is not fatal, 79 is another GPU), got %+v", f)
	}
}
