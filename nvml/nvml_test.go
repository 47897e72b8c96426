package nvml

import (
	"context"
	"errors"
	"math"
	"os"
	"testing"
	"testing/synctest"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
)

const gib = 1 << 30

// fakeGPU describes one mock device.
type fakeGPU struct {
	uuid, name         string
	total, used        uint64
	memRet, utilRet    gonvml.Return
	tempRet, procsRet  gonvml.Return
	compute, graphics  []gonvml.ProcessInfo
	util, temp         uint32
	registerEventsFunc func(uint64, gonvml.EventSet) gonvml.Return
}

func (g fakeGPU) device() *mock.Device {
	return &mock.Device{
		GetUUIDFunc: func() (string, gonvml.Return) { return g.uuid, gonvml.SUCCESS },
		GetNameFunc: func() (string, gonvml.Return) { return g.name, gonvml.SUCCESS },
		GetMemoryInfoFunc: func() (gonvml.Memory, gonvml.Return) {
			if g.memRet != gonvml.SUCCESS {
				return gonvml.Memory{}, g.memRet
			}
			return gonvml.Memory{Total: g.total, Used: g.used, Free: g.total - g.used}, gonvml.SUCCESS
		},
		GetUtilizationRatesFunc: func() (gonvml.Utilization, gonvml.Return) {
			return gonvml.Utilization{Gpu: g.util}, g.utilRet
		},
		GetTemperatureFunc: func(gonvml.TemperatureSensors) (uint32, gonvml.Return) {
			return g.temp, g.tempRet
		},
		GetComputeRunningProcessesFunc: func() ([]gonvml.ProcessInfo, gonvml.Return) {
			return g.compute, g.procsRet
		},
		GetGraphicsRunningProcessesFunc: func() ([]gonvml.ProcessInfo, gonvml.Return) {
			return g.graphics, g.procsRet
		},
		RegisterEventsFunc: g.registerEventsFunc,
	}
}

// fakeLib returns a mock library with the given devices. Event-set functions
// are left nil: tests that watch Xids set them.
func fakeLib(gpus ...fakeGPU) (*mock.Interface, []*mock.Device) {
	devs := make([]*mock.Device, len(gpus))
	for i, g := range gpus {
		devs[i] = g.device()
	}
	lib := &mock.Interface{
		InitFunc:           func() gonvml.Return { return gonvml.SUCCESS },
		ShutdownFunc:       func() gonvml.Return { return gonvml.SUCCESS },
		DeviceGetCountFunc: func() (int, gonvml.Return) { return len(devs), gonvml.SUCCESS },
		DeviceGetHandleByIndexFunc: func(i int) (gonvml.Device, gonvml.Return) {
			if i < 0 || i >= len(devs) {
				return nil, gonvml.ERROR_INVALID_ARGUMENT
			}
			return devs[i], gonvml.SUCCESS
		},
		SystemGetProcessNameFunc: func(pid int) (string, gonvml.Return) {
			if pid == 1234 {
				return "/usr/bin/python3", gonvml.SUCCESS
			}
			return "", gonvml.ERROR_NOT_FOUND
		},
		SystemGetDriverVersionFunc:     func() (string, gonvml.Return) { return "550.54.15", gonvml.SUCCESS },
		SystemGetCudaDriverVersionFunc: func() (int, gonvml.Return) { return 12040, gonvml.SUCCESS },
	}
	return lib, devs
}

func mustNew(t testing.TB, lib gonvml.Interface) *NVML {
	t.Helper()
	n, err := New(lib)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { n.Close() })
	return n
}

func TestInitFailureCallsNothingElse(t *testing.T) {
	for _, ret := range []gonvml.Return{gonvml.ERROR_LIBRARY_NOT_FOUND, gonvml.ERROR_DRIVER_NOT_LOADED, gonvml.ERROR_NO_PERMISSION} {
		t.Run(ret.Error(), func(t *testing.T) {
			// Only InitFunc is set: any other call panics.
			lib := &mock.Interface{InitFunc: func() gonvml.Return { return ret }}
			n, err := New(lib)
			if n != nil {
				t.Fatalf("New returned a reader after a failed Init")
			}
			if !errors.Is(err, ErrUnavailable) || !errors.Is(err, ret) {
				t.Fatalf("err = %v, want ErrUnavailable and %v in the chain", err, ret)
			}
			if got := len(lib.InitCalls()); got != 1 {
				t.Fatalf("Init called %d times", got)
			}
			t.Log(err)
		})
	}
}

func TestNewSystemWithoutDriver(t *testing.T) {
	if os.Getenv("NNGUARD_TEST_REAL_GPU") == "1" {
		t.Skip("a GPU is expected here")
	}
	if _, err := os.Stat("/proc/driver/nvidia"); err == nil {
		t.Skip("an NVIDIA driver is loaded")
	}
	n, err := NewSystem()
	if err == nil {
		n.Close()
		t.Fatal("NewSystem worked without a driver")
	}
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("err = %v, want ErrUnavailable", err)
	}
	var ret gonvml.Return
	if !errors.As(err, &ret) {
		t.Fatalf("err = %v has no gonvml.Return", err)
	}
	t.Log(err)
}

func TestDevices(t *testing.T) {
	lib, _ := fakeLib(
		fakeGPU{uuid: "GPU-aaa", name: "NVIDIA A100", total: 40 * gib, used: 10 * gib, util: 87, temp: 61},
		fakeGPU{uuid: "GPU-bbb", name: "Laptop", total: 8 * gib, used: 1 * gib,
			utilRet: gonvml.ERROR_NOT_SUPPORTED, tempRet: gonvml.ERROR_NOT_SUPPORTED},
	)
	n := mustNew(t, lib)
	devs, err := n.Devices()
	if err != nil {
		t.Fatal(err)
	}
	want := []Device{
		{Index: 0, UUID: "GPU-aaa", Name: "NVIDIA A100", TotalBytes: 40 * gib, UsedBytes: 10 * gib, FreeBytes: 30 * gib, UtilPercent: 87, TempC: 61},
		{Index: 1, UUID: "GPU-bbb", Name: "Laptop", TotalBytes: 8 * gib, UsedBytes: 1 * gib, FreeBytes: 7 * gib, UtilPercent: -1, TempC: -1},
	}
	if len(devs) != len(want) {
		t.Fatalf("got %d devices, want %d", len(devs), len(want))
	}
	for i := range want {
		if devs[i] != want[i] {
			t.Errorf("device %d = %+v, want %+v", i, devs[i], want[i])
		}
	}
	// Handles are looked up once.
	n.Devices()
	if got := len(lib.DeviceGetHandleByIndexCalls()); got != 2 {
		t.Errorf("DeviceGetHandleByIndex called %d times, want 2 (cached)", got)
	}
}

func TestDevicesMemoryNotSupportedAndErrors(t *testing.T) {
	lib, _ := fakeLib(
		fakeGPU{uuid: "GPU-unified", memRet: gonvml.ERROR_NOT_SUPPORTED},
		fakeGPU{uuid: "GPU-lost", memRet: gonvml.ERROR_GPU_IS_LOST},
		fakeGPU{uuid: "GPU-ok", total: 8 * gib},
	)
	n := mustNew(t, lib)
	devs, err := n.Devices()
	if !errors.Is(err, gonvml.ERROR_GPU_IS_LOST) {
		t.Fatalf("err = %v, want ERROR_GPU_IS_LOST in the chain", err)
	}
	if len(devs) != 2 || devs[0].UUID != "GPU-unified" || devs[0].TotalBytes != 0 || devs[1].UUID != "GPU-ok" {
		t.Fatalf("devices = %+v, want the unified one (no memory data) and the healthy one", devs)
	}
}

func TestProcesses(t *testing.T) {
	lib, _ := fakeLib(fakeGPU{
		uuid: "GPU-aaa", total: 40 * gib,
		compute: []gonvml.ProcessInfo{
			{Pid: 1234, UsedGpuMemory: 5 * gib},
			{Pid: 4242, UsedGpuMemory: math.MaxUint64}, // NVML_VALUE_NOT_AVAILABLE
		},
		graphics: []gonvml.ProcessInfo{
			{Pid: 1234, UsedGpuMemory: 5 * gib}, // same process in both lists
			{Pid: 77, UsedGpuMemory: 100 << 20},
		},
	})
	n := mustNew(t, lib)
	n.procName = func(pid int) string {
		if pid == 4242 {
			return "from-proc"
		}
		return ""
	}
	procs, err := n.Processes(0)
	if err != nil {
		t.Fatal(err)
	}
	want := []Process{
		{PID: 1234, Name: "/usr/bin/python3", UsedBytes: 5 * gib},
		{PID: 4242, Name: "from-proc", UsedBytes: 0},
		{PID: 77, Name: "", UsedBytes: 100 << 20},
	}
	if len(procs) != len(want) {
		t.Fatalf("processes = %+v, want %+v", procs, want)
	}
	for i := range want {
		if procs[i] != want[i] {
			t.Errorf("process %d = %+v, want %+v", i, procs[i], want[i])
		}
	}

	if _, err := n.Processes(5); !errors.Is(err, ErrNoDevice) {
		t.Errorf("Processes(5) err = %v, want ErrNoDevice", err)
	}
}

func TestProcessesNotSupported(t *testing.T) {
	lib, _ := fakeLib(fakeGPU{uuid: "GPU-aaa", procsRet: gonvml.ERROR_NOT_SUPPORTED})
	n := mustNew(t, lib)
	procs, err := n.Processes(0)
	if err != nil || len(procs) != 0 {
		t.Fatalf("Processes = %v, %v; want none and no error", procs, err)
	}
}

func TestProcessesError(t *testing.T) {
	lib, _ := fakeLib(fakeGPU{uuid: "GPU-aaa", procsRet: gonvml.ERROR_NO_PERMISSION})
	n := mustNew(t, lib)
	if _, err := n.Processes(0); !errors.Is(err, gonvml.ERROR_NO_PERMISSION) {
		t.Fatalf("err = %v, want ERROR_NO_PERMISSION", err)
	}
}

func TestProcNameOfSelf(t *testing.T) {
	if got := procName(os.Getpid()); got == "" {
		t.Fatal("procName of this process is empty")
	}
	if got := procName(-5); got != "" {
		t.Fatalf("procName(-5) = %q", got)
	}
}

func TestInfo(t *testing.T) {
	lib, _ := fakeLib()
	n := mustNew(t, lib)
	info, err := n.Info()
	if err != nil {
		t.Fatal(err)
	}
	if info != (Info{Driver: "550.54.15", CUDA: "12.4"}) {
		t.Fatalf("info = %+v", info)
	}
	lib.SystemGetCudaDriverVersionFunc = func() (int, gonvml.Return) { return 0, gonvml.ERROR_NOT_SUPPORTED }
	if info, err := n.Info(); err != nil || info.CUDA != "" {
		t.Fatalf("info = %+v, %v; want no CUDA and no error", info, err)
	}
	if got := CUDAVersion(13010); got != "13.1" {
		t.Errorf("CUDAVersion(13010) = %q", got)
	}
}

func TestClose(t *testing.T) {
	lib, _ := fakeLib(fakeGPU{uuid: "GPU-aaa"})
	n, err := New(lib)
	if err != nil {
		t.Fatal(err)
	}
	if err := n.Close(); err != nil {
		t.Fatal(err)
	}
	if err := n.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if got := len(lib.ShutdownCalls()); got != 1 {
		t.Fatalf("Shutdown called %d times", got)
	}
	if _, err := n.Devices(); !errors.Is(err, ErrClosed) {
		t.Fatalf("Devices after Close: %v", err)
	}
	if err := n.WatchXids(context.Background()); !errors.Is(err, ErrClosed) {
		t.Fatalf("WatchXids after Close: %v", err)
	}
}

// eventSource is a mock event set fed from a channel; Wait times out like
// NVML's (in synctest's fake time).
type eventSource struct {
	ch    chan gonvml.EventData
	set   *mock.EventSet
	freed chan struct{}
}

func newEventSource() *eventSource {
	e := &eventSource{ch: make(chan gonvml.EventData), freed: make(chan struct{})}
	e.set = &mock.EventSet{
		WaitFunc: func(ms uint32) (gonvml.EventData, gonvml.Return) {
			t := time.NewTimer(time.Duration(ms) * time.Millisecond)
			defer t.Stop()
			select {
			case ev := <-e.ch:
				return ev, gonvml.SUCCESS
			case <-t.C:
				return gonvml.EventData{}, gonvml.ERROR_TIMEOUT
			}
		},
		FreeFunc: func() gonvml.Return { close(e.freed); return gonvml.SUCCESS },
	}
	return e
}

func TestXids(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		var registered []uint64
		reg := func(mask uint64, _ gonvml.EventSet) gonvml.Return {
			registered = append(registered, mask)
			return gonvml.SUCCESS
		}
		lib, devs := fakeLib(
			fakeGPU{uuid: "GPU-aaa", registerEventsFunc: reg},
			fakeGPU{uuid: "GPU-old", registerEventsFunc: func(uint64, gonvml.EventSet) gonvml.Return {
				return gonvml.ERROR_NOT_SUPPORTED
			}},
			fakeGPU{uuid: "GPU-ccc", registerEventsFunc: reg},
		)
		src := newEventSource()
		lib.EventSetCreateFunc = func() (gonvml.EventSet, gonvml.Return) { return src.set, gonvml.SUCCESS }
		n, err := New(lib)
		if err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		if x, _ := n.Xids(start); x != nil {
			t.Fatalf("Xids before WatchXids = %v, want nil", x)
		}
		if err := n.WatchXids(t.Context()); err != nil {
			t.Fatal(err)
		}
		if err := n.WatchXids(t.Context()); err == nil {
			t.Fatal("second WatchXids worked")
		}
		if len(registered) != 2 || registered[0] != gonvml.EventTypeXidCriticalError {
			t.Fatalf("registered = %v", registered)
		}
		if x, _ := n.Xids(start); x == nil || len(x) != 0 {
			t.Fatalf("Xids with none seen = %#v, want empty and non-nil", x)
		}

		time.Sleep(3 * time.Second) // several Wait timeouts
		src.ch <- gonvml.EventData{Device: devs[2], EventType: gonvml.EventTypeXidCriticalError, EventData: 79}
		mid := time.Now()
		time.Sleep(time.Second)
		src.ch <- gonvml.EventData{Device: devs[0], EventType: gonvml.EventTypeXidCriticalError, EventData: 13}
		src.ch <- gonvml.EventData{Device: devs[0], EventType: gonvml.EventTypeSingleBitEccError, EventData: 1}
		synctest.Wait()

		all, _ := n.Xids(start)
		want := []Xid{
			{Device: 2, UUID: "GPU-ccc", Code: 79, Time: mid},
			{Device: 0, UUID: "GPU-aaa", Code: 13, Time: mid.Add(time.Second)},
		}
		if len(all) != len(want) {
			t.Fatalf("Xids = %+v, want %+v", all, want)
		}
		for i := range want {
			if all[i] != want[i] {
				t.Errorf("Xid %d = %+v, want %+v", i, all[i], want[i])
			}
		}
		if late, _ := n.Xids(mid.Add(time.Millisecond)); len(late) != 1 || late[0].Code != 13 {
			t.Errorf("Xids(since mid) = %+v", late)
		}
		if !IsFatalXid(all[0].Code) || IsFatalXid(all[1].Code) {
			t.Errorf("IsFatalXid(79), IsFatalXid(13) = %v, %v", IsFatalXid(79), IsFatalXid(13))
		}

		if err := n.Close(); err != nil {
			t.Fatal(err)
		}
		select {
		case <-src.freed:
		default:
			t.Fatal("event set not freed by Close")
		}
	})
}

func TestXidsStopOnContext(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		lib, _ := fakeLib(fakeGPU{uuid: "GPU-aaa", registerEventsFunc: func(uint64, gonvml.EventSet) gonvml.Return {
			return gonvml.SUCCESS
		}})
		src := newEventSource()
		// A Wait that fails: the watcher must pause, not spin.
		var waits int
		src.set.WaitFunc = func(uint32) (gonvml.EventData, gonvml.Return) {
			waits++
			return gonvml.EventData{}, gonvml.ERROR_UNKNOWN
		}
		lib.EventSetCreateFunc = func() (gonvml.EventSet, gonvml.Return) { return src.set, gonvml.SUCCESS }
		n := mustNew(t, lib)
		ctx, cancel := context.WithCancel(t.Context())
		if err := n.WatchXids(ctx); err != nil {
			t.Fatal(err)
		}
		time.Sleep(10*time.Second - time.Millisecond)
		synctest.Wait()
		if waits != 10 {
			t.Errorf("%d Waits in 10s of errors, want 10", waits)
		}
		cancel()
		synctest.Wait()
		select {
		case <-src.freed:
		default:
			t.Fatal("watcher did not stop on cancel")
		}
	})
}

func TestWatchXidsNotSupported(t *testing.T) {
	lib, _ := fakeLib(fakeGPU{uuid: "GPU-aaa", registerEventsFunc: func(uint64, gonvml.EventSet) gonvml.Return {
		return gonvml.ERROR_NOT_SUPPORTED
	}})
	src := newEventSource()
	lib.EventSetCreateFunc = func() (gonvml.EventSet, gonvml.Return) { return src.set, gonvml.SUCCESS }
	n := mustNew(t, lib)
	err := n.WatchXids(t.Context())
	if !errors.Is(err, gonvml.ERROR_NOT_SUPPORTED) {
		t.Fatalf("err = %v, want ERROR_NOT_SUPPORTED", err)
	}
	<-src.freed
	if x, _ := n.Xids(time.Time{}); x != nil {
		t.Fatalf("Xids = %v, want nil", x)
	}
}

func TestIsFatalXid(t *testing.T) {
	for _, c := range []uint64{48, 63, 64, 74, 79, 92, 94, 95, 119, 120} {
		if !IsFatalXid(c) || XidText(c) == "" {
			t.Errorf("Xid %d not fatal", c)
		}
	}
	for _, c := range []uint64{0, 13, 31, 43, 45} {
		if IsFatalXid(c) {
			t.Errorf("Xid %d fatal", c)
		}
	}
}

// TestRealGPU runs against the host's NVML when NNGUARD_TEST_REAL_GPU=1.
func TestRealGPU(t *testing.T) {
	if os.Getenv("NNGUARD_TEST_REAL_GPU") != "1" {
		t.Skip("set NNGUARD_TEST_REAL_GPU=1 to test the real NVML")
	}
	n, err := NewSystem()
	if err != nil {
		t.Fatal(err)
	}
	defer n.Close()
	info, err := n.Info()
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("driver %s, CUDA %s", info.Driver, info.CUDA)
	devs, err := n.Devices()
	if err != nil {
		t.Fatal(err)
	}
	if len(devs) == 0 {
		t.Fatal("no devices")
	}
	for _, d := range devs {
		t.Logf("device %+v", d)
		if d.TotalBytes == 0 || d.UsedBytes > d.TotalBytes {
			t.Errorf("device %d: total %d, used %d", d.Index, d.TotalBytes, d.UsedBytes)
		}
		procs, err := n.Processes(d.Index)
		if err != nil {
			t.Error(err)
		}
		for _, p := range procs {
			t.Logf("  process %+v", p)
		}
	}
	if err := n.WatchXids(t.Context()); err != nil {
		t.Logf("Xid events: %v", err)
	} else {
		x, err := n.Xids(time.Now().Add(-time.Hour))
		t.Logf("Xids: %v %v", x, err)
	}
	idx, err := Pick(devs, os.Getenv("CUDA_VISIBLE_DEVICES"))
	t.Logf("pick: %d %v", idx, err)
}
