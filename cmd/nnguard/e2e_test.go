package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// End-to-end tests: the real nnguard binary supervises the simulated trainer
// (sim/nnunetv2_train.py) under a real pty, on real files.

var nnguardBin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "nnguard-e2e-bin")
	if err != nil {
		panic(err)
	}
	nnguardBin = filepath.Join(dir, "nnguard")
	b, err := exec.Command("go", "build", "-race", "-o", nnguardBin, ".").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build nnguard: %v\n%s", err, b)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func repoPath(t testing.TB, rel string) string {
	t.Helper()
	p, err := filepath.Abs(filepath.Join("..", "..", rel))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

type tree struct {
	root, raw, pre, res string
}

func (tr tree) fold() string {
	return filepath.Join(tr.res, "Dataset004_Hippocampus", "nnUNetTrainer__nnUNetPlans__3d_fullres", "fold_0")
}

func mkTree(t *testing.T, batch int) tree {
	t.Helper()
	root := t.TempDir()
	out, err := exec.Command("python3", repoPath(t, "sim/mktree.py"), root, "--dataset-id", "4", "--dataset-name", "Hippocampus", "--batch-size", fmt.Sprint(batch)).CombinedOutput()
	if err != nil {
		t.Fatalf("mktree: %v\n%s", err, out)
	}
	return tree{root: root, raw: filepath.Join(root, "nnUNet_raw"), pre: filepath.Join(root, "nnUNet_preprocessed"), res: filepath.Join(root, "nnUNet_results")}
}

// fastSim are simulator knobs for runs of a few seconds.
func fastSim() map[string]string {
	return map[string]string{
		"NNGUARD_SIM_EPOCHS": "6", "NNGUARD_SIM_EPOCH_SECONDS": "0.15", "NNGUARD_SIM_SAVE_EVERY": "2",
		"NNGUARD_SIM_VAL_CASES": "3", "NNGUARD_SIM_VAL_CASE_SECONDS": "0.02", "NNGUARD_SIM_MAX_POOL": "1",
		"nnUNet_n_proc_DA": "2",
	}
}

// smallGPU adds the knobs of a simulated 8 GiB GPU (2 GB model + 1 GB per
// sample: batch 8 does not fit, 4 does) whose OOM comes at oomFromEpoch, and
// extra knobs, to the fast simulator's.
func smallGPU(oomFromEpoch string, extra ...string) map[string]string {
	k := fastSim()
	k["NNGUARD_SIM_GPU_MIB"] = "8192"
	k["NNGUARD_SIM_BASE_MIB"] = "2000"
	k["NNGUARD_SIM_SAMPLE_MIB"] = "1000"
	k["NNGUARD_SIM_OOM_FROM_EPOCH"] = oomFromEpoch
	for i := 0; i+1 < len(extra); i += 2 {
		k[extra[i]] = extra[i+1]
	}
	return k
}

type nng struct {
	t    *testing.T
	cmd  *exec.Cmd
	mu   sync.Mutex
	out  bytes.Buffer
	ch   chan struct{}
	done chan struct{}
	code int
}

func (tr tree) env(knobs map[string]string) []string {
	env := []string{}
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, "nnUNet_") || strings.HasPrefix(k, "NNGUARD_") || k == "PYTORCH_CUDA_ALLOC_CONF" || k == "CUDA_VISIBLE_DEVICES" {
			continue
		}
		env = append(env, kv)
	}
	env = append(env, "nnUNet_raw="+tr.raw, "nnUNet_preprocessed="+tr.pre, "nnUNet_results="+tr.res,
		"GORACE=atexit_sleep_ms=0") // the -race binary would sleep 1 s at exit
	for k, v := range knobs {
		env = append(env, k+"="+v)
	}
	return env
}

// start runs nnguard with the simulated trainer; output is collected.
func start(t *testing.T, tr tree, knobs map[string]string, args ...string) *nng {
	t.Helper()
	full := append([]string{"train", "--trainer-cmd", "python3 " + repoPath(t, "sim/nnunetv2_train.py"), "--backoff", "0s", "--grace", "3s", "--kill-after", "2s"}, args...)
	n := &nng{t: t, ch: make(chan struct{}, 1), done: make(chan struct{})}
	n.cmd = exec.Command(nnguardBin, full...)
	n.cmd.Env = tr.env(knobs)
	n.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	pr, pw := io.Pipe()
	n.cmd.Stdout = pw
	n.cmd.Stderr = pw
	if err := n.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	readerDone := make(chan struct{})
	go func() {
		defer close(readerDone)
		r := bufio.NewReader(pr)
		buf := make([]byte, 4096)
		for {
			k, err := r.Read(buf)
			n.mu.Lock()
			n.out.Write(buf[:k])
			n.mu.Unlock()
			select {
			case n.ch <- struct{}{}:
			default:
			}
			if err != nil {
				return
			}
		}
	}()
	go func() {
		err := n.cmd.Wait()
		n.code = n.cmd.ProcessState.ExitCode()
		if ws, ok := n.cmd.ProcessState.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			n.code = -int(ws.Signal())
		}
		_ = err
		pw.Close()
		<-readerDone
		close(n.done)
	}()
	t.Cleanup(func() {
		select {
		case <-n.done:
		default:
			n.cmd.Process.Kill()
			<-n.done
		}
		killLeftovers(tr)
	})
	return n
}

func (n *nng) output() string { n.mu.Lock(); defer n.mu.Unlock(); return n.out.String() }

func (n *nng) waitFor(want string, within time.Duration) {
	n.t.Helper()
	deadline := time.After(within)
	for !strings.Contains(n.output(), want) {
		select {
		case <-n.ch:
		case <-n.done:
			if !strings.Contains(n.output(), want) {
				n.t.Fatalf("nnguard exited before printing %q:\n%s", want, n.output())
			}
		case <-deadline:
			n.t.Fatalf("timeout waiting for %q:\n%s", want, n.output())
		}
	}
}

func (n *nng) wait(within time.Duration) int {
	n.t.Helper()
	select {
	case <-n.done:
	case <-time.After(within):
		n.t.Fatalf("nnguard did not finish within %s:\n%s", within, n.output())
	}
	return n.code
}

func runNN(t *testing.T, tr tree, knobs map[string]string, args ...string) (int, string) {
	t.Helper()
	n := start(t, tr, knobs, args...)
	code := n.wait(3 * time.Minute)
	return code, n.output()
}

// procsOf lists live processes whose environment names this tree's results
// folder: the trainer and every worker it forked.
func procsOf(tr tree) []int {
	var out []int
	ents, _ := os.ReadDir("/proc")
	needle := []byte("nnUNet_results=" + tr.res + "\x00")
	for _, e := range ents {
		var pid int
		if _, err := fmt.Sscan(e.Name(), &pid); err != nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "environ"))
		if err != nil || !bytes.Contains(b, needle) {
			continue
		}
		st, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if i := bytes.LastIndexByte(st, ')'); i > 0 && i+2 < len(st) && (st[i+2] == 'Z' || st[i+2] == 'X') {
			continue
		}
		out = append(out, pid)
	}
	return out
}

func killLeftovers(tr tree) {
	for _, p := range procsOf(tr) {
		syscall.Kill(p, syscall.SIGKILL)
	}
}

func assertNoProcesses(t *testing.T, tr tree) {
	t.Helper()
	if ps := procsOf(tr); len(ps) > 0 {
		t.Fatalf("trainer processes left behind: %v", ps)
	}
}

type event map[string]any

func readEvents(t *testing.T, fold string) []event {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(fold, "nnguard", "events.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	var evs []event
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		var e event
		if err := json.Unmarshal([]byte(line), &e); err != nil {
			t.Fatalf("bad event line %q: %v", line, err)
		}
		for _, k := range []string{"time", "event", "attempt"} {
			if _, ok := e[k]; !ok {
				t.Fatalf("event without %s: %s", k, line)
			}
		}
		if _, err := time.Parse(time.RFC3339, e["time"].(string)); err != nil {
			t.Fatalf("time not RFC 3339: %v", e["time"])
		}
		evs = append(evs, e)
	}
	return evs
}

func filter(evs []event, name string) []event {
	var out []event
	for _, e := range evs {
		if e["event"] == name {
			out = append(out, e)
		}
	}
	return out
}

func num(v any) int {
	f, _ := v.(float64)
	return int(f)
}

func argvOf(e event) string {
	var parts []string
	for _, a := range e["argv"].([]any) {
		parts = append(parts, a.(string))
	}
	return strings.Join(parts, " ")
}

func assertComplete(t *testing.T, tr tree) {
	t.Helper()
	for _, f := range []string{"checkpoint_final.pth", "validation/summary.json"} {
		if _, err := os.Stat(filepath.Join(tr.fold(), f)); err != nil {
			t.Fatalf("fold not complete: %v", err)
		}
	}
}

func readFile(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

var execCommand = exec.Command
