// Package doctor checks, before training, what nnguard and nnUNetv2_train
// need: GPUs and who else uses them, the nnUNet_* folders, the trainer and
// the versions of its Python packages (known-bad combinations), /dev/shm for
// the data-loading workers, host RAM and free disk.
//
// Run never fails: what it cannot check becomes a problem or a warning in the
// Report. Problems mean training under nnguard will fail or cannot resume;
// warnings are worth reading.
package doctor

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/nnguard/nnguard/nvml"
)

// Thresholds, all documented in the report's messages.
const (
	// MinFreeDisk is the free space below which the results folder is a
	// problem: checkpoints are written every 50 epochs (about 0.1-1 GiB
	// each, plus checkpoint_best) and the final validation exports
	// predictions.
	MinFreeDisk = 10 << 30
	// ShmPerWorker is the /dev/shm wanted per training data-loading worker:
	// batches cross from the workers to the main process as shared-memory
	// tensors, up to 2*num_cached batches per augmenter plus one per
	// worker, and the validation augmenter adds half as many workers again.
	// 512 MiB per training worker covers typical 3D batches with deep
	// supervision targets; a smaller /dev/shm ends in "No space left on
	// device" in a worker (nnU-Net issues #1411, #2162).
	ShmPerWorker = 512 << 20
	// RAMPerWorker is the host memory wanted per data-loading worker
	// (each holds a copy of its cases and augmentation buffers), plus
	// RAMBase for the main process.
	RAMPerWorker = 1 << 30
	RAMBase      = 4 << 30
	// DefaultNProcDA is nnU-Net's default worker count
	// (get_allowed_n_proc_DA: 12, capped at the host CPU count).
	DefaultNProcDA = 12
	// NotInstalled is the version of a distribution that is not installed.
	NotInstalled = "not installed"
	// NoWorkers is Options.NProcDA for nnUNet_n_proc_DA=0.
	NoWorkers = -1
	// probeTimeout bounds the Python version probe.
	probeTimeout = time.Minute
)

// Distributions are the Python distributions whose versions are read.
var Distributions = []string{"nnunetv2", "torch", "batchgenerators", "batchgeneratorsv2", "numpy"}

// EnvVars are the folders nnU-Net reads from the environment.
var EnvVars = []string{"nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"}

// Options says what to check and how; zero fields take the defaults.
type Options struct {
	// GPU is the GPU reader; nil when NVML is off, with GPUErr saying why.
	GPU    nvml.Reader
	GPUErr error
	// Getenv reads the environment the trainer will get (default os.Getenv).
	Getenv func(string) string
	// TrainerCmd is the trainer's argv (default ["nnUNetv2_train"]).
	TrainerCmd []string
	// LookPath finds a command on PATH (default exec.LookPath).
	LookPath func(string) (string, error)
	// RunPython runs `python -c code` and returns its standard output
	// (default: run it, bounded by a minute).
	RunPython func(ctx context.Context, python, code string) (string, error)
	// ShmPath is the shared-memory mount (default /dev/shm).
	ShmPath string
	// NProcDA is the number of data-loading workers the trainer will get
	// (nnguard sets nnUNet_n_proc_DA); 0 means as nnU-Net decides
	// (nnUNet_n_proc_DA, else 12 capped at the CPU count); NoWorkers (-1)
	// means nnUNet_n_proc_DA=0 (no worker processes).
	NProcDA int
	// MemInfoPath is read for host RAM (default /proc/meminfo).
	MemInfoPath string
	// Statfs returns total and free bytes of the file system holding path
	// (default syscall.Statfs).
	Statfs func(path string) (total, free uint64, err error)
	// Now is the clock for the Xid look-back (default time.Now).
	Now func() time.Time
}

// EnvCheck is one nnUNet_* folder.
type EnvCheck struct {
	Name     string `json:"name"`
	Value    string `json:"value"`
	Set      bool   `json:"set"`
	Exists   bool   `json:"exists"`
	Writable bool   `json:"writable"`
}

// Trainer describes the trainer command and its Python.
type Trainer struct {
	Cmd      string            `json:"cmd"`
	Path     string            `json:"path"`
	Found    bool              `json:"found"`
	Python   string            `json:"python"`
	Versions map[string]string `json:"versions"` // distribution -> version or NotInstalled; "python" too
}

// Report is the result of Run.
type Report struct {
	GPUs             []nvml.Device     `json:"gpus"`
	GPUOff           string            `json:"gpu_off,omitempty"`
	Foreign          []nvml.Process    `json:"foreign"`
	Driver           string            `json:"driver"`
	CUDA             string            `json:"cuda"`
	Env              []EnvCheck        `json:"env"`
	Trainer          Trainer           `json:"trainer"`
	NProcDA          int               `json:"n_proc_da"`
	ShmBytes         uint64            `json:"shm_bytes"`
	ShmFree          uint64            `json:"shm_free"`
	HostRAM          uint64            `json:"host_ram"`
	HostRAMAvailable uint64            `json:"host_ram_available"`
	DiskFree         map[string]uint64 `json:"disk_free"`
	Problems         []string          `json:"problems"`
	Warnings         []string          `json:"warnings"`
}

// OK reports whether no problem was found.
func (r Report) OK() bool { return len(r.Problems) == 0 }

func (r *Report) problem(format string, a ...any) {
	r.Problems = append(r.Problems, fmt.Sprintf(format, a...))
}

func (r *Report) warn(format string, a ...any) {
	r.Warnings = append(r.Warnings, fmt.Sprintf(format, a...))
}

func (o *Options) defaults() {
	if o.Getenv == nil {
		o.Getenv = os.Getenv
	}
	if len(o.TrainerCmd) == 0 {
		o.TrainerCmd = []string{"nnUNetv2_train"}
	}
	if o.LookPath == nil {
		o.LookPath = exec.LookPath
	}
	if o.RunPython == nil {
		o.RunPython = runPython
	}
	if o.ShmPath == "" {
		o.ShmPath = "/dev/shm"
	}
	if o.MemInfoPath == "" {
		o.MemInfoPath = "/proc/meminfo"
	}
	if o.Statfs == nil {
		o.Statfs = statfs
	}
	if o.Now == nil {
		o.Now = time.Now
	}
}

// Run checks everything and returns the report.
func Run(ctx context.Context, opts Options) Report {
	opts.defaults()
	r := Report{
		DiskFree: map[string]uint64{},
		Foreign:  []nvml.Process{},
		GPUs:     []nvml.Device{},
		Problems: []string{},
		Warnings: []string{},
	}
	checkGPU(&r, opts)
	checkEnv(&r, opts)
	checkTrainer(ctx, &r, opts)
	checkVersions(&r)
	checkWorkers(&r, opts)
	return r
}

func checkGPU(r *Report, o Options) {
	if o.GPU == nil {
		r.GPUOff = "no GPU reader"
		if o.GPUErr != nil {
			r.GPUOff = o.GPUErr.Error()
		}
		r.warn("GPU monitoring is off (%s): no memory samples, no Xid events, no foreign-process check", r.GPUOff)
		return
	}
	if info, err := o.GPU.Info(); err != nil {
		r.warn("driver version: %v", err)
	} else {
		r.Driver, r.CUDA = info.Driver, info.CUDA
	}
	devs, err := o.GPU.Devices()
	if err != nil {
		r.problem("reading the GPUs: %v", err)
	}
	r.GPUs = append(r.GPUs, devs...)
	if len(devs) == 0 {
		if err == nil {
			r.problem("NVML sees no GPU")
		}
		return
	}
	visible := o.Getenv("CUDA_VISIBLE_DEVICES")
	if _, err := nvml.Visible(devs, visible); err != nil {
		r.problem("CUDA_VISIBLE_DEVICES=%q hides every GPU: %v", visible, err)
	}
	for _, d := range devs {
		procs, err := o.GPU.Processes(d.Index)
		if err != nil {
			r.warn("GPU %d: processes: %v", d.Index, err)
			continue
		}
		var used uint64
		for _, p := range procs {
			used += p.UsedBytes
		}
		r.Foreign = append(r.Foreign, procs...)
		if len(procs) > 0 {
			r.warn("GPU %d: %d other process(es) hold GPU memory (%s by the processes, %s used on the device); the trainer gets less",
				d.Index, len(procs), gib(used), gib(d.UsedBytes))
		}
	}
	if xids, err := o.GPU.Xids(o.Now().Add(-24 * time.Hour)); err == nil {
		for _, x := range xids {
			if nvml.IsFatalXid(x.Code) {
				r.warn("GPU %d had Xid %d (%s) at %s: the GPU may need a reset", x.Device, x.Code, nvml.XidText(x.Code), x.Time.Format(time.RFC3339))
			}
		}
	}
}

func checkEnv(r *Report, o Options) {
	for _, name := range EnvVars {
		c := EnvCheck{Name: name, Value: o.Getenv(name)}
		c.Set = c.Value != ""
		if c.Set {
			if fi, err := os.Stat(c.Value); err == nil && fi.IsDir() {
				c.Exists = true
				c.Writable = syscall.Access(c.Value, 2 /* W_OK */) == nil
			}
		}
		r.Env = append(r.Env, c)

		// nnUNet_raw is not read by training: its absence is only a warning.
		report := r.problem
		if name == "nnUNet_raw" {
			report = r.warn
		}
		switch {
		case !c.Set:
			report("%s is not set (export it to the folder nnU-Net should use)", name)
		case !c.Exists:
			report("%s=%s is not an existing folder", name, c.Value)
		case name == "nnUNet_results" && !c.Writable:
			r.problem("%s=%s is not writable: checkpoints cannot be saved", name, c.Value)
		case name == "nnUNet_preprocessed" && !c.Writable:
			r.warn("%s=%s is not writable: nnU-Net <= 2.5 unpacks the data there before training", name, c.Value)
		}
		if !c.Exists || name == "nnUNet_raw" {
			continue
		}
		_, free, err := o.Statfs(c.Value)
		if err != nil {
			r.warn("free disk of %s: %v", c.Value, err)
			continue
		}
		r.DiskFree[c.Value] = free
		if free < MinFreeDisk {
			if name == "nnUNet_results" {
				r.problem("only %s free on %s (%s); checkpoints and the final validation need at least %s", gib(free), c.Value, name, gib(MinFreeDisk))
			} else {
				r.warn("only %s free on %s (%s)", gib(free), c.Value, name)
			}
		}
	}
}

func checkTrainer(ctx context.Context, r *Report, o Options) {
	t := &r.Trainer
	t.Cmd = strings.Join(o.TrainerCmd, " ")
	t.Versions = map[string]string{}
	path, err := o.LookPath(o.TrainerCmd[0])
	if err != nil {
		r.problem("trainer %q not found on PATH: %v", o.TrainerCmd[0], err)
		return
	}
	t.Path, t.Found = path, true
	if isPython(path) {
		t.Python = path
	} else {
		py, err := shebangPython(path, o.LookPath)
		if err != nil {
			r.warn("cannot tell the trainer's Python (%v): versions not checked", err)
			return
		}
		t.Python = py
	}
	ctx, cancel := context.WithTimeout(ctx, probeTimeout)
	defer cancel()
	out, err := o.RunPython(ctx, t.Python, probeCode)
	if err != nil {
		r.problem("running %s to read package versions: %v", t.Python, err)
		return
	}
	v, err := parseProbe(out)
	if err != nil {
		r.problem("reading package versions from %s: %v", t.Python, err)
		return
	}
	t.Versions = v
}

// probeCode prints the versions as one JSON line, without importing the
// packages (importing torch is slow and may touch the GPU).
const probeCode = `import json, sys
from importlib import metadata
out = {"python": sys.version.split()[0]}
for d in ("nnunetv2", "torch", "batchgenerators", "batchgeneratorsv2", "numpy"):
    try:
        out[d] = metadata.version(d)
    except metadata.PackageNotFoundError:
        out[d] = None
print(json.dumps(out))
`

func parseProbe(out string) (map[string]string, error) {
	// The last non-empty line: a sitecustomize may print before us.
	lines := strings.Split(strings.TrimSpace(out), "\n")
	last := strings.TrimSpace(lines[len(lines)-1])
	var raw map[string]*string
	if err := json.Unmarshal([]byte(last), &raw); err != nil {
		return nil, fmt.Errorf("doctor: version probe printed %q: %w", last, err)
	}
	v := make(map[string]string, len(raw))
	for _, d := range Distributions {
		v[d] = NotInstalled
	}
	for k, s := range raw {
		if s != nil {
			v[k] = *s
		}
	}
	return v, nil
}

func runPython(ctx context.Context, python, code string) (string, error) {
	cmd := exec.CommandContext(ctx, python, "-c", code)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		if msg := strings.TrimSpace(stderr.String()); msg != "" {
			return "", fmt.Errorf("doctor: %s: %w: %s", python, err, lastLine(msg))
		}
		return "", fmt.Errorf("doctor: %s: %w", python, err)
	}
	return string(out), nil
}

func lastLine(s string) string {
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[i+1:]
	}
	return s
}

func isPython(path string) bool {
	base := filepath.Base(path)
	return base == "python" || strings.HasPrefix(base, "python3") || strings.HasPrefix(base, "python2")
}

// shebangPython reads a console script's interpreter: "#!/x/python3",
// "#!/usr/bin/env python3", or pip's long-path form
// "#!/bin/sh" + "”'exec' /x/python3 "$0" "$@"".
func shebangPython(path string, lookPath func(string) (string, error)) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("doctor: %w", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 4096), 4096)
	if !sc.Scan() {
		return "", fmt.Errorf("doctor: %s: no shebang line", path)
	}
	first := sc.Text()
	if !strings.HasPrefix(first, "#!") {
		return "", fmt.Errorf("doctor: %s is not a script", path)
	}
	fields := strings.Fields(strings.TrimPrefix(first, "#!"))
	if len(fields) == 0 {
		return "", fmt.Errorf("doctor: %s: empty shebang", path)
	}
	interp := fields[0]
	switch {
	case filepath.Base(interp) == "env":
		args := fields[1:]
		for len(args) > 0 && strings.HasPrefix(args[0], "-") { // env -S
			args = args[1:]
		}
		if len(args) == 0 {
			return "", fmt.Errorf("doctor: %s: %q names no interpreter", path, first)
		}
		return lookPath(args[0])
	case filepath.Base(interp) == "sh" && sc.Scan():
		second := sc.Text()
		if rest, ok := strings.CutPrefix(second, "'''exec' "); ok {
			if rest, ok := strings.CutPrefix(rest, `"`); ok {
				if py, _, ok := strings.Cut(rest, `"`); ok {
					return py, nil
				}
			}
			if py, _, ok := strings.Cut(rest, " "); ok {
				return py, nil
			}
		}
		return "", fmt.Errorf("doctor: %s: a shell script, not a Python console script", path)
	case isPython(interp):
		return interp, nil
	}
	return "", fmt.Errorf("doctor: %s runs %s, not Python", path, interp)
}

// checkVersions applies the known-bad combinations (nnunet-facts §9).
func checkVersions(r *Report) {
	v := r.Trainer.Versions
	if len(v) == 0 {
		return
	}
	nn, torch := v["nnunetv2"], v["torch"]
	if nn == NotInstalled {
		r.problem("nnunetv2 is not installed for %s", r.Trainer.Python)
	}
	if torch == NotInstalled {
		r.problem("torch is not installed for %s", r.Trainer.Python)
	}
	if nn != NotInstalled {
		nnv := parseVersion(nn)
		if torch != NotInstalled && less(nnv, []int{2, 6}) && !less(parseVersion(torch), []int{2, 6}) {
			r.problem("nnU-Net %s with torch %s cannot resume: torch >= 2.6 loads with weights_only=True and nnU-Net < 2.6 does not pass weights_only=False, so every --c restart fails; upgrade nnunetv2 to >= 2.6 or use torch < 2.6", nn, torch)
		}
		if less(nnv, []int{2, 2}) {
			r.warn("nnU-Net %s crashes on --c when no checkpoint exists (fixed in 2.2); nnguard resumes with --c only once a checkpoint is there", nn)
		}
		if !less(nnv, []int{2, 5}) && v["batchgeneratorsv2"] == NotInstalled {
			r.problem("nnU-Net %s needs batchgeneratorsv2, which is not installed", nn)
		}
		if v["batchgenerators"] == NotInstalled {
			r.problem("nnU-Net %s needs batchgenerators, which is not installed", nn)
		}
	}
	if torch != NotInstalled {
		tv := parseVersion(torch)
		if len(tv) >= 2 && tv[0] == 2 && tv[1] == 9 {
			r.warn("torch %s: nnU-Net >= 2.6.4 excludes torch 2.9.* (requirement torch!=2.9.*)", torch)
		}
		checkTorchCUDA(r, torch)
	}
}

// checkTorchCUDA compares a "+cuXYZ" torch build with the driver's CUDA.
func checkTorchCUDA(r *Report, torch string) {
	_, local, ok := strings.Cut(torch, "+cu")
	if !ok || r.CUDA == "" || len(local) < 3 {
		return
	}
	n, err := strconv.Atoi(local)
	if err != nil {
		return
	}
	built := []int{n / 10, n % 10} // cu124 -> 12.4, cu118 -> 11.8
	drv := parseVersion(r.CUDA)
	if len(drv) < 2 {
		return // "simulated" or unparsable
	}
	switch {
	case drv[0] < built[0]:
		r.problem("torch %s is built for CUDA %d.%d but the driver supports only CUDA %s: torch will not see the GPU; update the driver or install a matching torch", torch, built[0], built[1], r.CUDA)
	case less(drv, built):
		r.warn("torch %s is built for CUDA %d.%d, the driver supports CUDA %s: minor-version compatibility usually works, a newer driver is safer", torch, built[0], built[1], r.CUDA)
	}
}

// parseVersion reads the leading numeric components: "2.5.1+cu124" -> [2 5 1],
// "2.6.0rc1" -> [2 6 0], "2.10" -> [2 10].
func parseVersion(s string) []int {
	var out []int
	for _, part := range strings.Split(s, ".") {
		end := 0
		for end < len(part) && part[end] >= '0' && part[end] <= '9' {
			end++
		}
		if end == 0 {
			break
		}
		n, _ := strconv.Atoi(part[:end])
		out = append(out, n)
		if end < len(part) {
			break
		}
	}
	return out
}

// less compares versions component-wise; missing components are 0.
func less(a, b []int) bool {
	for i := 0; i < max(len(a), len(b)); i++ {
		var x, y int
		if i < len(a) {
			x = a[i]
		}
		if i < len(b) {
			y = b[i]
		}
		if x != y {
			return x < y
		}
	}
	return false
}

// nProcDA returns the worker count nnU-Net will use.
func nProcDA(r *Report, o Options) int {
	switch {
	case o.NProcDA > 0:
		return o.NProcDA
	case o.NProcDA < 0:
		return 0
	}
	if s := o.Getenv("nnUNet_n_proc_DA"); s != "" {
		n, err := strconv.Atoi(strings.TrimSpace(s))
		if err != nil || n < 0 {
			r.problem("nnUNet_n_proc_DA=%q is not a whole number >= 0 (a negative value makes nnU-Net wait forever for its first batch)", s)
			return DefaultNProcDA
		}
		return n
	}
	return min(DefaultNProcDA, runtime.NumCPU())
}

func checkWorkers(r *Report, o Options) {
	n := nProcDA(r, o)
	r.NProcDA = n
	total, free, err := o.Statfs(o.ShmPath)
	if err != nil {
		r.warn("%s: %v", o.ShmPath, err)
	} else {
		r.ShmBytes, r.ShmFree = total, free
		need := uint64(n) * ShmPerWorker
		switch {
		case n == 0:
		case total < need:
			r.problem("%s is %s, %d data-loading workers want %s (%s each): workers will fail with \"No space left on device\"; give the container --shm-size=%dg or set nnUNet_n_proc_DA=%d",
				o.ShmPath, gib(total), n, gib(need), gib(ShmPerWorker), (need+(1<<30)-1)>>30, max(1, int(total/ShmPerWorker)))
		case free < need:
			r.warn("%s has %s free of %s, %d workers want %s: stale torch_* files from killed runs?", o.ShmPath, gib(free), gib(total), n, gib(need))
		}
	}
	memTotal, memAvail, err := readMemInfo(o.MemInfoPath)
	if err != nil {
		r.warn("host RAM: %v", err)
		return
	}
	r.HostRAM, r.HostRAMAvailable = memTotal, memAvail
	workers := n + max(1, n/2) // training + validation augmenters
	if n == 0 {
		workers = 0
	}
	if need := uint64(RAMBase) + uint64(workers)*RAMPerWorker; memAvail < need {
		r.warn("%s of host RAM available, %d data-loading workers and the trainer want about %s: the kernel may kill workers (lower nnUNet_n_proc_DA)",
			gib(memAvail), workers, gib(need))
	}
}

// readMemInfo returns MemTotal and MemAvailable in bytes.
func readMemInfo(path string) (total, avail uint64, err error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, 0, fmt.Errorf("doctor: %w", err)
	}
	var haveTotal, haveAvail bool
	for line := range strings.Lines(string(b)) {
		key, rest, ok := strings.Cut(line, ":")
		if !ok {
			continue
		}
		f := strings.Fields(rest)
		if len(f) == 0 {
			continue
		}
		n, err := strconv.ParseUint(f[0], 10, 64)
		if err != nil {
			continue
		}
		if len(f) > 1 && f[1] == "kB" {
			n *= 1024
		}
		switch key {
		case "MemTotal":
			total, haveTotal = n, true
		case "MemAvailable":
			avail, haveAvail = n, true
		}
	}
	if !haveTotal || !haveAvail {
		return 0, 0, errors.New("doctor: " + path + " lacks MemTotal or MemAvailable")
	}
	return total, avail, nil
}

func statfs(path string) (total, free uint64, err error) {
	var st syscall.Statfs_t
	if err := syscall.Statfs(path, &st); err != nil {
		return 0, 0, fmt.Errorf("doctor: statfs %s: %w", path, err)
	}
	return st.Blocks * uint64(st.Bsize), st.Bavail * uint64(st.Bsize), nil
}

func gib(b uint64) string {
	switch {
	case b >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(b)/(1<<30))
	default:
		return fmt.Sprintf("%.0f MiB", float64(b)/(1<<20))
	}
}
