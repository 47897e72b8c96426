// Package nvml gives nnguard the few GPU facts it needs (memory, processes,
// driver versions, Xid faults) through go-nvml, as plain Go types.
//
// Three things implement Reader: *NVML (the real library behind a
// gonvml.Interface, so tests pass go-nvml's mock.Interface), the simulated GPU
// of NewSimFile (a JSON file written by the stand-in trainer), and whatever a
// test wants. Sampler polls a Reader and keeps the trainer's peak memory.
//
// NVML rules kept here: after a failed Init nothing else is called (any other
// call would kill the process with "undefined symbol"); the gonvml.Return code
// stays in the error chain (errors.Is(err, gonvml.ERROR_GPU_IS_LOST) works);
// ERROR_NOT_SUPPORTED for a query means "no data" (-1 or 0), not failure.
package nvml

import (
	"context"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	gonvml "github.com/NVIDIA/go-nvml/pkg/nvml"
)

// MiB is 2^20 bytes.
const MiB = 1 << 20

// Device is one GPU as NVML numbers it (PCI bus order, which is CUDA's order
// only under CUDA_DEVICE_ORDER=PCI_BUS_ID).
type Device struct {
	Index       int    `json:"index"`
	UUID        string `json:"uuid"`
	Name        string `json:"name"`
	TotalBytes  uint64 `json:"total_bytes"`
	UsedBytes   uint64 `json:"used_bytes"`
	FreeBytes   uint64 `json:"free_bytes"`
	UtilPercent int    `json:"util_percent"` // -1 when not supported
	TempC       int    `json:"temp_c"`       // -1 when not supported
}

// Process is a process holding a context on a GPU.
type Process struct {
	PID       int    `json:"pid"` // as NVML sees it: the host PID namespace
	Name      string `json:"name"`
	UsedBytes uint64 `json:"used_bytes"` // 0 when unknown
	Device    int    `json:"device"`
}

// Xid is one Xid event reported by the driver. Device is -1 when the event
// could not be tied to a device.
type Xid struct {
	Device int       `json:"device"`
	UUID   string    `json:"uuid"`
	Code   uint64    `json:"code"`
	Time   time.Time `json:"time"` // when nnguard received it
}

// Info holds the driver's versions.
type Info struct {
	Driver string `json:"driver"` // e.g. "550.54.15"
	CUDA   string `json:"cuda"`   // highest CUDA version the driver supports, e.g. "12.4"
}

// Reader is what the rest of nnguard needs from a GPU source.
type Reader interface {
	// Devices returns every device. On error the slice holds the devices
	// that could be read.
	Devices() ([]Device, error)
	// Processes returns the processes with a context on device index.
	Processes(index int) ([]Process, error)
	// Info returns the driver versions ("" where not known).
	Info() (Info, error)
	// Xids returns the Xid events seen at or after since, oldest first;
	// nil when the source cannot report Xids (for *NVML: WatchXids was not
	// called or failed).
	Xids(since time.Time) ([]Xid, error)
	// Close releases the source.
	Close() error
}

var (
	// ErrUnavailable means NVML could not be initialised (no driver, no
	// library, no permission); GPU monitoring is off.
	ErrUnavailable = errors.New("nvml: GPU monitoring is off")
	// ErrClosed is returned by calls after Close.
	ErrClosed = errors.New("nvml: closed")
	// ErrNoDevice is returned for a device index or selection that matches
	// no device.
	ErrNoDevice = errors.New("nvml: no such device")
)

// maxXids bounds the Xid events kept in memory (oldest dropped first).
const maxXids = 1024

// NVML is a Reader over a gonvml.Interface. It is safe for concurrent use.
type NVML struct {
	lib gonvml.Interface
	now func() time.Time
	// procName reads a process name from /proc; replaced in tests.
	procName func(pid int) string
	// noTemp and noProcName skip calls whose symbol the library lacks.
	noTemp, noProcName bool

	mu      sync.RWMutex // held for reading around NVML calls, for writing by Close
	closed  bool
	hmu     sync.Mutex
	handles map[int]gonvml.Device

	xmu      sync.Mutex
	xids     []Xid // nil until WatchXids succeeds
	watching bool
	cancel   context.CancelFunc
	done     chan struct{}
}

var _ Reader = (*NVML)(nil)

// New initialises lib and returns a Reader over it. If Init fails the error
// wraps both ErrUnavailable and the gonvml.Return code, and no other function
// of lib has been called.
func New(lib gonvml.Interface) (*NVML, error) {
	if ret := lib.Init(); ret != gonvml.SUCCESS {
		return nil, fmt.Errorf("%w: %w", ErrUnavailable, ret)
	}
	return &NVML{
		lib:      lib,
		now:      time.Now,
		procName: procName,
		handles:  make(map[int]gonvml.Device),
	}, nil
}

// NewSystem opens the host's NVML library (libnvidia-ml.so.1). Optional
// symbols that a driver may lack (deprecated ones) are looked up first: calling
// a missing symbol would kill the process.
func NewSystem() (*NVML, error) {
	lib := gonvml.New()
	n, err := New(lib)
	if err != nil {
		return nil, err
	}
	ext := lib.Extensions()
	n.noTemp = ext.LookupSymbol("nvmlDeviceGetTemperature") != nil
	n.noProcName = ext.LookupSymbol("nvmlSystemGetProcessName") != nil
	return n, nil
}

func nvmlErr(what string, ret gonvml.Return) error {
	return fmt.Errorf("nvml: %s: %w", what, ret)
}

// device returns the cached handle of index. Callers hold n.mu for reading.
func (n *NVML) device(index int) (gonvml.Device, error) {
	n.hmu.Lock()
	defer n.hmu.Unlock()
	if h, ok := n.handles[index]; ok {
		return h, nil
	}
	h, ret := n.lib.DeviceGetHandleByIndex(index)
	if ret != gonvml.SUCCESS {
		if ret == gonvml.ERROR_INVALID_ARGUMENT {
			return nil, fmt.Errorf("nvml: device %d: %w: %w", index, ErrNoDevice, ret)
		}
		return nil, nvmlErr(fmt.Sprintf("device %d", index), ret)
	}
	n.handles[index] = h
	return h, nil
}

// Devices implements Reader.
func (n *NVML) Devices() ([]Device, error) {
	n.mu.RLock()
	defer n.mu.RUnlock()
	if n.closed {
		return nil, ErrClosed
	}
	count, ret := n.lib.DeviceGetCount()
	if ret != gonvml.SUCCESS {
		return nil, nvmlErr("device count", ret)
	}
	devs := make([]Device, 0, count)
	var errs []error
	for i := 0; i < count; i++ {
		d, err := n.readDevice(i)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		devs = append(devs, d)
	}
	return devs, errors.Join(errs...)
}

func (n *NVML) readDevice(i int) (Device, error) {
	h, err := n.device(i)
	if err != nil {
		return Device{}, err
	}
	d := Device{Index: i, UtilPercent: -1, TempC: -1}
	var ret gonvml.Return
	what := func(s string) string { return fmt.Sprintf("device %d: %s", i, s) }

	if d.UUID, ret = h.GetUUID(); ret != gonvml.SUCCESS && ret != gonvml.ERROR_NOT_SUPPORTED {
		return Device{}, nvmlErr(what("uuid"), ret)
	}
	if d.Name, ret = h.GetName(); ret != gonvml.SUCCESS && ret != gonvml.ERROR_NOT_SUPPORTED {
		return Device{}, nvmlErr(what("name"), ret)
	}
	mem, ret := h.GetMemoryInfo()
	switch ret {
	case gonvml.SUCCESS:
		d.TotalBytes, d.UsedBytes, d.FreeBytes = mem.Total, mem.Used, mem.Free
	case gonvml.ERROR_NOT_SUPPORTED: // e.g. unified-memory parts: no data
	default:
		return Device{}, nvmlErr(what("memory"), ret)
	}
	util, ret := h.GetUtilizationRates()
	switch ret {
	case gonvml.SUCCESS:
		d.UtilPercent = int(util.Gpu)
	case gonvml.ERROR_NOT_SUPPORTED:
	default:
		return Device{}, nvmlErr(what("utilization"), ret)
	}
	if !n.noTemp {
		temp, ret := h.GetTemperature(gonvml.TEMPERATURE_GPU)
		switch ret {
		case gonvml.SUCCESS:
			d.TempC = int(temp)
		case gonvml.ERROR_NOT_SUPPORTED:
		default:
			return Device{}, nvmlErr(what("temperature"), ret)
		}
	}
	return d, nil
}

// Processes implements Reader: compute and graphics processes, merged by PID.
func (n *NVML) Processes(index int) ([]Process, error) {
	n.mu.RLock()
	defer n.mu.RUnlock()
	if n.closed {
		return nil, ErrClosed
	}
	h, err := n.device(index)
	if err != nil {
		return nil, err
	}
	compute, ret := h.GetComputeRunningProcesses()
	if ret != gonvml.SUCCESS && ret != gonvml.ERROR_NOT_SUPPORTED {
		return nil, nvmlErr(fmt.Sprintf("device %d: compute processes", index), ret)
	}
	graphics, ret := h.GetGraphicsRunningProcesses()
	if ret != gonvml.SUCCESS && ret != gonvml.ERROR_NOT_SUPPORTED {
		return nil, nvmlErr(fmt.Sprintf("device %d: graphics processes", index), ret)
	}
	var procs []Process
	seen := make(map[int]int, len(compute)+len(graphics)) // pid -> position in procs
	for _, list := range [][]gonvml.ProcessInfo{compute, graphics} {
		for _, p := range list {
			used := p.UsedGpuMemory
			if used == math.MaxUint64 { // NVML_VALUE_NOT_AVAILABLE (no permission, containers)
				used = 0
			}
			pid := int(p.Pid)
			if at, ok := seen[pid]; ok {
				procs[at].UsedBytes = max(procs[at].UsedBytes, used)
				continue
			}
			seen[pid] = len(procs)
			procs = append(procs, Process{PID: pid, UsedBytes: used, Device: index})
		}
	}
	for i := range procs {
		procs[i].Name = n.processName(procs[i].PID)
	}
	return procs, nil
}

// processName asks NVML, then /proc (comm, then cmdline); "" when neither knows.
func (n *NVML) processName(pid int) string {
	if !n.noProcName {
		if name, ret := n.lib.SystemGetProcessName(pid); ret == gonvml.SUCCESS && name != "" {
			return name
		}
	}
	return n.procName(pid)
}

func procName(pid int) string {
	dir := filepath.Join("/proc", strconv.Itoa(pid))
	if b, err := os.ReadFile(filepath.Join(dir, "comm")); err == nil {
		if s := strings.TrimSpace(string(b)); s != "" {
			return s
		}
	}
	if b, err := os.ReadFile(filepath.Join(dir, "cmdline")); err == nil {
		arg0, _, _ := strings.Cut(string(b), "\x00")
		return arg0
	}
	return ""
}

// Info implements Reader.
func (n *NVML) Info() (Info, error) {
	n.mu.RLock()
	defer n.mu.RUnlock()
	if n.closed {
		return Info{}, ErrClosed
	}
	var info Info
	driver, ret := n.lib.SystemGetDriverVersion()
	switch ret {
	case gonvml.SUCCESS:
		info.Driver = driver
	case gonvml.ERROR_NOT_SUPPORTED:
	default:
		return Info{}, nvmlErr("driver version", ret)
	}
	cuda, ret := n.lib.SystemGetCudaDriverVersion()
	switch ret {
	case gonvml.SUCCESS:
		info.CUDA = CUDAVersion(cuda)
	case gonvml.ERROR_NOT_SUPPORTED:
	default:
		return Info{}, nvmlErr("cuda version", ret)
	}
	return info, nil
}

// CUDAVersion formats NVML's integer CUDA version (1000*major + 10*minor,
// e.g. 12040) as "12.4".
func CUDAVersion(v int) string {
	if v <= 0 {
		return ""
	}
	return fmt.Sprintf("%d.%d", v/1000, v%1000/10)
}

// Close stops the Xid watcher, if any, and shuts NVML down. Later calls
// return ErrClosed; a second Close returns nil.
func (n *NVML) Close() error {
	n.mu.Lock()
	if n.closed {
		n.mu.Unlock()
		return nil
	}
	n.closed = true // no call starts after this; those in flight are done
	n.mu.Unlock()
	n.stopXids()
	if ret := n.lib.Shutdown(); ret != gonvml.SUCCESS {
		return nvmlErr("shutdown", ret)
	}
	return nil
}
