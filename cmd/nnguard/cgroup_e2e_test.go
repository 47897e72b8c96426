package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// memCgroup makes a memory cgroup limited to limit bytes and returns the
// file to write a pid into; it skips the test where cgroups cannot be made
// (not root, no memory controller).
func memCgroup(t *testing.T, limit int64) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create a memory cgroup")
	}
	name := fmt.Sprintf("nnguard-test-%d", os.Getpid())
	var dir, procs string
	var files map[string]string
	if b, err := os.ReadFile("/sys/fs/cgroup/cgroup.controllers"); err == nil && strings.Contains(string(b), "memory") {
		dir = filepath.Join("/sys/fs/cgroup", name) // cgroup v2
		files = map[string]string{"memory.max": fmt.Sprint(limit), "memory.swap.max": "0"}
	} else if st, err := os.Stat("/sys/fs/cgroup/memory"); err == nil && st.IsDir() {
		dir = filepath.Join("/sys/fs/cgroup/memory", name) // cgroup v1
		files = map[string]string{"memory.limit_in_bytes": fmt.Sprint(limit), "memory.memsw.limit_in_bytes": fmt.Sprint(limit)}
	} else {
		t.Skip("no memory cgroup controller")
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Skip("cannot create a memory cgroup:", err)
	}
	t.Cleanup(func() {
		// the cgroup is empty once nnguard and the trainer are gone
		for i := 0; i < 100; i++ {
			if err := syscall.Rmdir(dir); err == nil || os.IsNotExist(err) {
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Errorf("could not remove cgroup %s", dir)
	})
	for f, v := range files {
		if err := os.WriteFile(filepath.Join(dir, f), []byte(v), 0o644); err != nil && !strings.Contains(f, "sw") {
			t.Skip("cannot set", f, err)
		}
	}
	procs = filepath.Join(dir, "cgroup.procs")
	return procs
}

// TestKernelOOMKillOfAWorkerLowersWorkers: real memory, a real limit, the
// real kernel OOM killer. Six data-augmentation workers of 150 MiB each do
// not fit in 700 MiB; nnguard must see the dead worker and the cgroup's
// oom_kill counter, diagnose host_oom and train with fewer workers.
func TestKernelOOMKillOfAWorkerLowersWorkers(t *testing.T) {
	procs := memCgroup(t, 700<<20)
	tr := mkTree(t, 2)
	knobs := fastSim()
	knobs["nnUNet_n_proc_DA"] = "4"
	knobs["NNGUARD_SIM_REAL_WORKER_MIB"] = "150"
	knobs["NNGUARD_SIM_EPOCHS"] = "4"
	knobs["NNGUARD_SIM_EPOCH_SECONDS"] = "0.3"
	args := []string{"train", "--trainer-cmd", "python3 " + repoPath(t, "sim/nnunetv2_train.py"), "--backoff", "0s", "--grace", "3s", "4", "3d_fullres", "0"}
	// enter the cgroup, then become nnguard: the trainer and its workers follow
	cmd := exec.Command("sh", append([]string{"-c", `echo $$ > "$0" && exec "$@"`, procs, nnguardBin}, args...)...)
	cmd.Env = tr.env(knobs)
	out, err := cmd.CombinedOutput()
	t.Cleanup(func() { killLeftovers(tr) })
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	evs := readEvents(t, tr.fold())
	fails := filter(evs, "failure")
	if len(fails) == 0 || fails[0]["class"] != "host_oom" {
		t.Fatalf("failures %v\n%s", fails, out)
	}
	if len(filter(evs, "cgroup_oom_kill")) == 0 || !strings.Contains(fmt.Sprint(fails[0]["evidence"]), "oom_kill rose") {
		t.Fatalf("the cgroup's oom_kill rise is not in the evidence: %v", fails[0])
	}
	t.Logf("failure: %v %v", fails[0]["class"], fails[0]["evidence"])
	acts := filter(evs, "action")
	if acts[0]["kind"] != "lower_workers" || num(acts[0]["to"]) != 2 {
		t.Fatalf("actions %v", acts)
	}
	assertComplete(t, tr)
	assertNoProcesses(t, tr)
}
