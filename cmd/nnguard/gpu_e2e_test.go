package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// simGPU are knobs for a simulated 8 GiB GPU whose state file nnguard reads
// (the hidden --sim-gpu flag, env NNGUARD_SIM_GPU_STATE).
func simGPU(t *testing.T) map[string]string {
	k := fastSim()
	k["NNGUARD_SIM_GPU_STATE"] = filepath.Join(t.TempDir(), "gpu.json")
	k["NNGUARD_SIM_GPU_MIB"] = "8192"
	k["NNGUARD_SIM_BASE_MIB"] = "2000"
	k["NNGUARD_SIM_SAMPLE_MIB"] = "1000"
	return k
}

// TestContentionWaitsInsteadOfLoweringBatchSize: another job holds 4 GiB of
// the GPU for a few seconds; the batch size (4, 6 GiB) fits the GPU alone.
// nnguard must see the foreign process, wait, and resume at batch size 4.
func TestContentionWaitsInsteadOfLoweringBatchSize(t *testing.T) {
	tr := mkTree(t, 4)
	k := simGPU(t)
	k["NNGUARD_SIM_FOREIGN_MIB"] = "4000"
	k["NNGUARD_SIM_FOREIGN_SECONDS"] = "600"
	// the other job is already on the GPU when nnguard starts
	writeGPU := func(until time.Time) {
		u := float64(until.UnixNano()) / 1e9
		foreign := map[string]any{"pid": 999999, "name": "foreign_job", "used_mib": 4000, "until": u}
		state, _ := json.Marshal(map[string]any{"name": "Simulated GPU", "uuid": "GPU-sim-0", "total_mib": 8192, "used_mib": 4000,
			"processes": []any{foreign}, "xids": []any{}, "foreign": foreign})
		tmp := k["NNGUARD_SIM_GPU_STATE"] + ".tmp"
		if err := os.WriteFile(tmp, state, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, k["NNGUARD_SIM_GPU_STATE"]); err != nil {
			t.Fatal(err)
		}
	}
	writeGPU(time.Now().Add(10 * time.Minute))
	n := start(t, tr, k, "--wait-for-gpu", "60s", "--sample-interval", "200ms", "4", "3d_fullres", "0")
	n.waitFor("waiting up to", time.Minute)
	// the other job ends while nnguard waits (the trainer is not running)
	writeGPU(time.Now().Add(-time.Second))
	code := n.wait(2 * time.Minute)
	out := n.output()
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, out)
	}
	evs := readEvents(t, tr.fold())
	if f := filter(evs, "failure"); len(f) != 1 || f[0]["class"] != "gpu_contention" {
		t.Fatalf("failure %v", f)
	}
	acts := filter(evs, "action")
	if len(acts) != 1 || acts[0]["kind"] != "wait_for_gpu" || acts[0]["class"] != "gpu_contention" {
		t.Fatalf("actions %v\n%s", acts, out)
	}
	for _, s := range filter(evs, "attempt_start") {
		if num(s["batch_size"]) != 4 {
			t.Fatalf("batch size changed: %v", s)
		}
	}
	w := filter(evs, "gpu_wait_end")
	if len(w) != 1 || w[0]["released"] != true {
		t.Fatalf("gpu wait %v", w)
	}
	if !strings.Contains(out, "foreign_job") {
		t.Fatalf("preflight did not name the foreign process:\n%s", out)
	}
	if len(filter(evs, "preflight")) != 2 {
		t.Fatal("want a preflight before each attempt")
	}
	// the attempt's GPU peak is recorded
	ends := filter(evs, "attempt_end")
	g, ok := ends[len(ends)-1]["gpu"].(map[string]any)
	if !ok || num(g["peak_tree_mib"]) < 6000 {
		t.Fatalf("attempt_end gpu %v", ends[len(ends)-1]["gpu"])
	}
	assertComplete(t, tr)
	assertNoProcesses(t, tr)
}

// TestGPUFaultGivesUpWithExit5: a critical Xid (79, fallen off the bus)
// during training: no retry on this GPU, a distinct exit code.
func TestGPUFaultGivesUpWithExit5(t *testing.T) {
	tr := mkTree(t, 2)
	k := simGPU(t)
	k["NNGUARD_SIM_XID_AT_EPOCH"] = "2"
	code, out := runNN(t, tr, k, "4", "3d_fullres", "0")
	if code != 5 {
		t.Fatalf("exit %d, want 5\n%s", code, out)
	}
	evs := readEvents(t, tr.fold())
	if f := filter(evs, "failure"); len(f) != 1 || f[0]["class"] != "gpu_fault" || !strings.Contains(fmt.Sprint(f[0]["evidence"]), "Xid 79") {
		t.Fatalf("failure %v", f)
	}
	acts := filter(evs, "action")
	if len(acts) != 1 || acts[0]["kind"] != "give_up" || acts[0]["class"] != "gpu_fault" || !strings.Contains(acts[0]["reason"].(string), "Xid 79") {
		t.Fatalf("actions %v", acts)
	}
	if n := len(filter(evs, "attempt_start")); n != 1 {
		t.Fatalf("retried on a faulty GPU: %d attempts", n)
	}
	ends := filter(evs, "run_end")
	if ends[0]["outcome"] != "gave_up" || num(ends[0]["exit_code"]) != 5 {
		t.Fatalf("run_end %v", ends)
	}
	assertNoProcesses(t, tr)
}

// TestNoNVMLSaysSoOnceAndTrains: this machine has no NVIDIA driver.
func TestNoNVMLSaysSoOnceAndTrains(t *testing.T) {
	if _, err := os.Stat("/dev/nvidiactl"); err == nil {
		t.Skip("a GPU driver is present")
	}
	tr := mkTree(t, 2)
	code, out := runNN(t, tr, fastSim(), "4", "3d_fullres", "0")
	if code != 0 {
		t.Fatalf("exit %d\n%s", code, out)
	}
	if c := strings.Count(out, "GPU monitoring is off"); c != 1 {
		t.Fatalf("want the NVML notice once, got %d:\n%s", c, out)
	}
	var st map[string]any
	if err := json.Unmarshal(readFile(t, filepath.Join(tr.fold(), "nnguard", "state.json")), &st); err != nil {
		t.Fatal(err)
	}
	if st["outcome"] != "completed" {
		t.Fatalf("state %v", st)
	}
}
