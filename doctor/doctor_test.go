package doctor

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/nnguard/nnguard/nvml"
)

const gb = 1 << 30

// fixture is a machine where everything is fine; tests break one thing.
type fixture struct {
	env      map[string]string
	opts     Options
	pyCalls  []string
	versions string // JSON printed by the fake python
	shmTotal uint64
	free     map[string]uint64
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	dir := t.TempDir()
	f := &fixture{
		env:      map[string]string{},
		versions: `{"python": "3.11.7", "nnunetv2": "2.6.4", "torch": "2.7.1+cu126", "batchgenerators": "0.25.1", "batchgeneratorsv2": "0.3.5", "numpy": "2.1.3"}`,
		shmTotal: 32 * gb,
		free:     map[string]uint64{},
	}
	for _, name := range EnvVars {
		p := filepath.Join(dir, name)
		if err := os.Mkdir(p, 0o755); err != nil {
			t.Fatal(err)
		}
		f.env[name] = p
		f.free[p] = 500 * gb
	}
	bin := filepath.Join(dir, "bin")
	os.Mkdir(bin, 0o755)
	script := filepath.Join(bin, "nnUNetv2_train")
	writeFile(t, script, "#!/opt/venv/bin/python3\n# -*- coding: utf-8 -*-\nimport sys\n")
	meminfo := filepath.Join(dir, "meminfo")
	writeFile(t, meminfo, "MemTotal:       65536000 kB\nMemFree:  1000 kB\nMemAvailable:   52428800 kB\n")

	gpuFile := filepath.Join(dir, "gpu.json")
	writeFile(t, gpuFile, `{"name": "Simulated GPU", "uuid": "GPU-sim-0", "total_mib": 24576, "used_mib": 0, "processes": []}`)

	f.opts = Options{
		GPU:    nvml.NewSimFile(gpuFile),
		Getenv: func(k string) string { return f.env[k] },
		LookPath: func(name string) (string, error) {
			if name == "nnUNetv2_train" {
				return script, nil
			}
			return "", exec.ErrNotFound
		},
		RunPython: func(ctx context.Context, python, code string) (string, error) {
			f.pyCalls = append(f.pyCalls, python)
			if !strings.Contains(code, "importlib") {
				t.Errorf("probe code does not use importlib.metadata: %s", code)
			}
			return "some noise from sitecustomize\n" + f.versions + "\n", nil
		},
		ShmPath:     "/dev/shm",
		NProcDA:     12,
		MemInfoPath: meminfo,
		Statfs: func(path string) (uint64, uint64, error) {
			if path == "/dev/shm" {
				return f.shmTotal, f.shmTotal, nil
			}
			if free, ok := f.free[path]; ok {
				return 1000 * gb, free, nil
			}
			return 0, 0, errors.New("no such mount")
		},
	}
	return f
}

func writeFile(t *testing.T, path, body string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(body), 0o755); err != nil {
		t.Fatal(err)
	}
}

func hasLine(lines []string, substr string) bool {
	for _, l := range lines {
		if strings.Contains(l, substr) {
			return true
		}
	}
	return false
}

func TestRunAllGood(t *testing.T) {
	f := newFixture(t)
	r := Run(t.Context(), f.opts)
	if !r.OK() || len(r.Warnings) != 0 {
		t.Fatalf("problems %q, warnings %q\n%s", r.Problems, r.Warnings, r.Text())
	}
	if len(f.pyCalls) != 1 || f.pyCalls[0] != "/opt/venv/bin/python3" {
		t.Fatalf("python calls = %v, want the shebang's interpreter", f.pyCalls)
	}
	if r.Trainer.Versions["torch"] != "2.7.1+cu126" || r.Trainer.Versions["python"] != "3.11.7" {
		t.Fatalf("versions = %v", r.Trainer.Versions)
	}
	if len(r.GPUs) != 1 || r.GPUs[0].TotalBytes != 24576*nvml.MiB {
		t.Fatalf("GPUs = %+v", r.GPUs)
	}
	if r.HostRAM != 65536000*1024 || r.HostRAMAvailable != 52428800*1024 {
		t.Fatalf("host RAM = %d / %d", r.HostRAM, r.HostRAMAvailable)
	}
	if r.DiskFree[f.env["nnUNet_results"]] != 500*gb || len(r.DiskFree) != 2 {
		t.Fatalf("disk free = %v", r.DiskFree)
	}
	for _, e := range r.Env {
		if !e.Set || !e.Exists || !e.Writable {
			t.Errorf("env check %+v", e)
		}
	}
	text := r.Text()
	for _, want := range []string{"GPU 0", "Simulated GPU", "nnunetv2 2.6.4, torch 2.7.1+cu126", "OK:", "nnUNet_results"} {
		if !strings.Contains(text, want) {
			t.Errorf("text lacks %q:\n%s", want, text)
		}
	}
	t.Log("\n" + text)

	b, err := json.Marshal(r)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	json.Unmarshal(b, &m)
	for _, key := range []string{"gpus", "foreign", "env", "trainer", "shm_bytes", "shm_free", "host_ram", "disk_free", "problems", "warnings"} {
		if _, ok := m[key]; !ok {
			t.Errorf("JSON lacks %q: %s", key, b)
		}
	}
	if !strings.Contains(string(b), `"total_bytes"`) || !strings.Contains(string(b), `"writable":true`) {
		t.Errorf("JSON not snake_case: %s", b)
	}
}

func TestRunProblems(t *testing.T) {
	tests := []struct {
		name     string
		change   func(f *fixture)
		problem  string // substring of a problem; "" = none expected
		warning  string // substring of a warning; "" = not checked
		ok       bool
		noPython bool
	}{
		{name: "results unset", change: func(f *fixture) { delete(f.env, "nnUNet_results") }, problem: "nnUNet_results is not set"},
		{name: "preprocessed missing", change: func(f *fixture) { f.env["nnUNet_preprocessed"] = "/nonexistent/pre" }, problem: "nnUNet_preprocessed=/nonexistent/pre is not an existing folder"},
		{name: "raw unset is a warning", change: func(f *fixture) { delete(f.env, "nnUNet_raw") }, warning: "nnUNet_raw is not set", ok: true},
		{name: "low disk on results", change: func(f *fixture) { f.free[f.env["nnUNet_results"]] = 3 * gb }, problem: "only 3.0 GiB free"},
		{name: "trainer not on PATH", change: func(f *fixture) {
			f.opts.TrainerCmd = []string{"nnUNetv2_train_custom"}
		}, problem: `trainer "nnUNetv2_train_custom" not found`, noPython: true},
		{name: "small shm", change: func(f *fixture) { f.shmTotal = 64 << 20 }, problem: "/dev/shm is 64 MiB, 12 data-loading workers want 6.0 GiB"},
		{name: "no workers need no shm", change: func(f *fixture) { f.shmTotal = 64 << 20; f.opts.NProcDA = NoWorkers }, ok: true},
		{name: "workers from env", change: func(f *fixture) {
			f.shmTotal = 1 * gb
			f.opts.NProcDA = 0
			f.env["nnUNet_n_proc_DA"] = "2"
		}, ok: true},
		{name: "bad n_proc_DA", change: func(f *fixture) { f.opts.NProcDA = 0; f.env["nnUNet_n_proc_DA"] = "-1" }, problem: "nnUNet_n_proc_DA=\"-1\""},
		{name: "CUDA_VISIBLE_DEVICES hides all", change: func(f *fixture) { f.env["CUDA_VISIBLE_DEVICES"] = "3" }, problem: "hides every GPU"},
		{name: "GPU off", change: func(f *fixture) {
			f.opts.GPU = nil
			f.opts.GPUErr = errors.New("nvml: GPU monitoring is off: ERROR_LIBRARY_NOT_FOUND")
		}, warning: "GPU monitoring is off (nvml: GPU monitoring is off: ERROR_LIBRARY_NOT_FOUND)", ok: true},
		{name: "nnunetv2 missing", change: func(f *fixture) {
			f.versions = `{"nnunetv2": null, "torch": "2.7.1", "batchgenerators": null, "batchgeneratorsv2": null, "numpy": "2.1.3"}`
		}, problem: "nnunetv2 is not installed for /opt/venv/bin/python3"},
		{name: "old nnU-Net new torch", change: func(f *fixture) {
			f.versions = `{"nnunetv2": "2.5.2", "torch": "2.6.0+cu124", "batchgenerators": "0.25.1", "batchgeneratorsv2": "0.2.1", "numpy": "1.26.4"}`
		}, problem: "nnU-Net 2.5.2 with torch 2.6.0+cu124 cannot resume"},
		{name: "python crashes", change: func(f *fixture) {
			f.opts.RunPython = func(context.Context, string, string) (string, error) { return "", errors.New("exit status 1") }
		}, problem: "running /opt/venv/bin/python3"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t)
			tt.change(f)
			r := Run(t.Context(), f.opts)
			if tt.problem != "" && !hasLine(r.Problems, tt.problem) {
				t.Errorf("no problem %q in %q", tt.problem, r.Problems)
			}
			if tt.warning != "" && !hasLine(r.Warnings, tt.warning) {
				t.Errorf("no warning %q in %q", tt.warning, r.Warnings)
			}
			if tt.ok != r.OK() {
				t.Errorf("OK = %v, want %v; problems %q", r.OK(), tt.ok, r.Problems)
			}
			if tt.noPython && len(f.pyCalls) != 0 {
				t.Errorf("python ran: %v", f.pyCalls)
			}
			if !r.OK() && !strings.Contains(r.Text(), "NOT OK") {
				t.Errorf("text does not say NOT OK:\n%s", r.Text())
			}
		})
	}
}

func TestForeignProcesses(t *testing.T) {
	f := newFixture(t)
	gpuFile := filepath.Join(t.TempDir(), "gpu.json")
	writeFile(t, gpuFile, `{"total_mib": 24576, "used_mib": 6000,
		"processes": [{"pid": 4321, "name": "jupyter", "used_mib": 6000}],
		"xids": [{"xid": 79, "time": 1.0e12}]}`)
	f.opts.GPU = nvml.NewSimFile(gpuFile)
	r := Run(t.Context(), f.opts)
	if len(r.Foreign) != 1 || r.Foreign[0].PID != 4321 {
		t.Fatalf("foreign = %+v", r.Foreign)
	}
	if !hasLine(r.Warnings, "GPU 0: 1 other process(es) hold GPU memory (5.9 GiB") {
		t.Errorf("warnings = %q", r.Warnings)
	}
	if !hasLine(r.Warnings, "Xid 79 (GPU has fallen off the bus)") {
		t.Errorf("no Xid warning in %q", r.Warnings)
	}
	if !strings.Contains(r.Text(), "pid 4321 jupyter") {
		t.Errorf("text:\n%s", r.Text())
	}
}

func TestCheckVersions(t *testing.T) {
	tests := []struct {
		name              string
		nn, torch, cuda   string
		problem, warning  string
		noProblem, noWarn bool
	}{
		{name: "current", nn: "2.8.1", torch: "2.8.0+cu128", cuda: "12.8", noProblem: true, noWarn: true},
		{name: "2.5.2 + torch 2.6", nn: "2.5.2", torch: "2.6.0", problem: "cannot resume"},
		{name: "2.5.1 + torch 2.10", nn: "2.5.1", torch: "2.10.0", problem: "cannot resume"},
		{name: "2.5.2 + torch 2.5", nn: "2.5.2", torch: "2.5.1+cu124", noProblem: true},
		{name: "2.6.0 + torch 2.6", nn: "2.6.0", torch: "2.6.0", noProblem: true},
		{name: "2.1 --c crash", nn: "2.1", torch: "2.0.1", warning: "crashes on --c", noProblem: true},
		{name: "2.0 --c crash", nn: "2.0", torch: "2.0.1", warning: "crashes on --c"},
		{name: "torch 2.9", nn: "2.6.2", torch: "2.9.1", warning: "excludes torch 2.9.*", noProblem: true},
		{name: "torch rc", nn: "2.7.0", torch: "2.9.0rc1", warning: "excludes torch 2.9.*"},
		{name: "driver too old", nn: "2.7.0", torch: "2.7.1+cu128", cuda: "11.8", problem: "torch will not see the GPU"},
		{name: "driver minor behind", nn: "2.7.0", torch: "2.7.1+cu128", cuda: "12.4", warning: "minor-version compatibility", noProblem: true},
		{name: "torch missing", nn: "2.7.0", torch: NotInstalled, problem: "torch is not installed"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := Report{CUDA: tt.cuda, Trainer: Trainer{Python: "py", Versions: map[string]string{
				"nnunetv2": tt.nn, "torch": tt.torch, "batchgenerators": "0.25.1", "batchgeneratorsv2": "0.3.5", "numpy": "2.0",
			}}}
			checkVersions(&r)
			if tt.problem != "" && !hasLine(r.Problems, tt.problem) {
				t.Errorf("no problem %q in %q", tt.problem, r.Problems)
			}
			if tt.warning != "" && !hasLine(r.Warnings, tt.warning) {
				t.Errorf("no warning %q in %q", tt.warning, r.Warnings)
			}
			if tt.noProblem && len(r.Problems) > 0 {
				t.Errorf("problems %q", r.Problems)
			}
			if tt.noWarn && len(r.Warnings) > 0 {
				t.Errorf("warnings %q", r.Warnings)
			}
		})
	}
}

func TestParseVersion(t *testing.T) {
	for in, want := range map[string][]int{
		"2.5.1+cu124": {2, 5, 1}, "2.6.0rc1": {2, 6, 0}, "2.10": {2, 10}, "2": {2}, "dev": nil, "": nil,
	} {
		if got := parseVersion(in); !slices.Equal(got, want) {
			t.Errorf("parseVersion(%q) = %v, want %v", in, got, want)
		}
	}
	if !less([]int{2, 5, 2}, []int{2, 6}) || less([]int{2, 6}, []int{2, 6, 0}) || !less(nil, []int{0, 1}) {
		t.Error("less")
	}
}

func TestShebangPython(t *testing.T) {
	dir := t.TempDir()
	look := func(name string) (string, error) { return "/usr/local/bin/" + name, nil }
	tests := []struct {
		name, body, want string
		wantErr          bool
	}{
		{name: "direct", body: "#!/home/u/venv/bin/python3.11\nimport x\n", want: "/home/u/venv/bin/python3.11"},
		{name: "env", body: "#!/usr/bin/env python3\n", want: "/usr/local/bin/python3"},
		{name: "env -S", body: "#!/usr/bin/env -S python3 -u\n", want: "/usr/local/bin/python3"},
		{name: "pip long path", body: "#!/bin/sh\n'''exec' \"/very long/venv/bin/python\" \"$0\" \"$@\"\n' '''\n", want: "/very long/venv/bin/python"},
		{name: "pip long path unquoted", body: "#!/bin/sh\n'''exec' /long/venv/bin/python \"$0\" \"$@\"\n' '''\n", want: "/long/venv/bin/python"},
		{name: "shell script", body: "#!/bin/sh\nexec foo\n", wantErr: true},
		{name: "binary", body: "\x7fELF...", wantErr: true},
		{name: "perl", body: "#!/usr/bin/perl\n", wantErr: true},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := filepath.Join(dir, "s"+string(rune('a'+i)))
			writeFile(t, p, tt.body)
			got, err := shebangPython(p, look)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("got %q, want an error", got)
				}
				return
			}
			if err != nil || got != tt.want {
				t.Fatalf("got %q, %v; want %q", got, err, tt.want)
			}
		})
	}
}

// TestRealPythonProbe runs this machine's python3 with the real probe code.
func TestRealPythonProbe(t *testing.T) {
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("no python3 on PATH")
	}
	f := newFixture(t)
	f.opts.TrainerCmd = []string{"python3", "-m", "nnunetv2.run.run_training"}
	f.opts.LookPath = exec.LookPath
	f.opts.RunPython = nil // the real one
	r := Run(t.Context(), f.opts)
	if r.Trainer.Python != py {
		t.Fatalf("python = %q, want %q", r.Trainer.Python, py)
	}
	v := r.Trainer.Versions
	if v["python"] == "" || v["python"] == NotInstalled {
		t.Fatalf("versions = %v: no python version", v)
	}
	for _, d := range Distributions {
		if v[d] == "" {
			t.Errorf("no entry for %s in %v", d, v)
		}
	}
	if v["nnunetv2"] == NotInstalled && !hasLine(r.Problems, "nnunetv2 is not installed") {
		t.Errorf("nnunetv2 missing but not reported: %q", r.Problems)
	}
	t.Logf("versions %v\nproblems %q", v, r.Problems)
}

func TestReadMemInfo(t *testing.T) {
	total, avail, err := readMemInfo("/proc/meminfo")
	if err != nil {
		t.Skip(err)
	}
	if total == 0 || avail > total {
		t.Fatalf("total %d, available %d", total, avail)
	}
	bad := filepath.Join(t.TempDir(), "meminfo")
	writeFile(t, bad, "MemTotal: 10 kB\n")
	if _, _, err := readMemInfo(bad); err == nil {
		t.Fatal("no error without MemAvailable")
	}
}

func TestStatfs(t *testing.T) {
	total, free, err := statfs(t.TempDir())
	if err != nil || total == 0 || free > total {
		t.Fatalf("statfs = %d, %d, %v", total, free, err)
	}
	if _, _, err := statfs("/nonexistent/x"); err == nil {
		t.Fatal("statfs of a missing path worked")
	}
}
