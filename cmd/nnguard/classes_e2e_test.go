package main

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// One end-to-end test per root-cause class the simulated trainer can
// produce: the real nnguard binary supervises sim/nnunetv2_train.py and the
// tests check the action it takes, as recorded in events.jsonl, and that no
// trainer process is left behind.

// simKnobs is fastSim() with extra knobs on top. GORACE drops the race
// runtime's 1 s sleep at nnguard's exit.
func simKnobs(extra map[string]string) map[string]string {
	k := fastSim()
	k["GORACE"] = "atexit_sleep_ms=0"
	for n, v := range extra {
		k[n] = v
	}
	return k
}

// onceFile is a fresh NNGUARD_SIM_ONCE_FILE path: faults listed there fire
// only once.
func onceFile(t *testing.T) string {
	return filepath.Join(t.TempDir(), "once.json")
}

// outcome is what one supervised run recorded.
type outcome struct {
	code     int
	out      string
	evs      []event
	fails    []event
	acts     []event
	starts   []event
	runEnd   event
	duration time.Duration
}

// fold0 trains Dataset004_Hippocampus 3d_fullres fold 0 of mkTree's tree.
var fold0 = []string{"4", "3d_fullres", "0"}

// supervise runs nnguard (with args; fold0 when none) to the end and reads
// its records.
func supervise(t *testing.T, tr tree, knobs map[string]string, args ...string) outcome {
	t.Helper()
	if len(args) == 0 {
		args = fold0
	}
	t0 := time.Now()
	code, out := runNN(t, tr, knobs, args...)
	o := outcome{code: code, out: out, duration: time.Since(t0)}
	o.evs = readEvents(t, tr.fold())
	o.fails = filter(o.evs, "failure")
	o.acts = filter(o.evs, "action")
	o.starts = filter(o.evs, "attempt_start")
	ends := filter(o.evs, "run_end")
	if len(ends) != 1 {
		t.Fatalf("want one run_end event, got %v\n%s", ends, out)
	}
	o.runEnd = ends[0]
	assertNoProcesses(t, tr)
	return o
}

// dump is the context a failed assertion prints.
func (o outcome) dump() string {
	var b strings.Builder
	for _, e := range o.evs {
		switch e["event"] {
		case "attempt_start":
			b.WriteString("attempt_start " + argvOf(e) + "\n")
		case "failure", "action", "run_end", "attempt_end":
			b.WriteString(formatEvent(e) + "\n")
		}
	}
	return b.String() + "---- output ----\n" + o.out
}

func formatEvent(e event) string {
	var parts []string
	for _, k := range []string{"event", "attempt", "class", "kind", "from", "to", "reason", "exit_code", "signal", "outcome", "epoch"} {
		if v, ok := e[k]; ok {
			parts = append(parts, k+"="+toString(v))
		}
	}
	return strings.Join(parts, " ")
}

func toString(v any) string {
	switch x := v.(type) {
	case string:
		return x
	case float64:
		return strconv.FormatFloat(x, 'f', -1, 64)
	default:
		return jsonString(x)
	}
}

// actionValue is an action's from or to as text: a number, a word, or ""
// when there is none (null, or an empty string).
func actionValue(v any) string {
	if v == nil {
		return ""
	}
	return toString(v)
}

func jsonString(v any) string {
	b, _ := jsonMarshal(v)
	return string(b)
}

// fields returns one string field of each event, in order.
func fields(evs []event, key string) []string {
	var out []string
	for _, e := range evs {
		s, _ := e[key].(string)
		out = append(out, s)
	}
	return out
}

func envOf(e event) map[string]any {
	m, _ := e["env"].(map[string]any)
	return m
}

// wantFlow checks the failure classes, the action kinds (with from and to
// when given as "kind from->to"), the number of attempts and the run's end.
func (o outcome) wantFlow(t *testing.T, classes []string, actions []string, attempts int, outcome string, code int) {
	t.Helper()
	if got := fields(o.fails, "class"); strings.Join(got, ",") != strings.Join(classes, ",") {
		t.Fatalf("failure classes %v, want %v\n%s", got, classes, o.dump())
	}
	var got []string
	for i, a := range o.acts {
		s := a["kind"].(string)
		if i < len(actions) && strings.Contains(actions[i], " ") {
			s += " " + actionValue(a["from"]) + "->" + actionValue(a["to"])
		}
		got = append(got, s)
	}
	if strings.Join(got, ",") != strings.Join(actions, ",") {
		t.Fatalf("actions %v, want %v\n%s", got, actions, o.dump())
	}
	if len(o.starts) != attempts {
		t.Fatalf("%d attempts, want %d\n%s", len(o.starts), attempts, o.dump())
	}
	if o.runEnd["outcome"] != outcome || num(o.runEnd["exit_code"]) != code || num(o.runEnd["attempts"]) != attempts {
		t.Fatalf("run_end %v, want outcome %s exit %d after %d attempts\n%s", o.runEnd, outcome, code, attempts, o.dump())
	}
	if o.code != code {
		t.Fatalf("nnguard exited %d, want %d\n%s", o.code, code, o.dump())
	}
}

func hasArg(argv, arg string) bool {
	for _, a := range strings.Fields(argv) {
		if a == arg {
			return true
		}
	}
	return false
}

func TestClassShmExhaustedLowersWorkers(t *testing.T) {
	t.Parallel()
	tr := mkTree(t, 2)
	o := supervise(t, tr, simKnobs(map[string]string{
		"NNGUARD_SIM_FAIL": "shm_exhausted", "NNGUARD_SIM_FAIL_EPOCH": "2", "NNGUARD_SIM_SHM_WORKERS": "2",
		"nnUNet_n_proc_DA": "4",
	}))
	o.wantFlow(t, []string{"shm_exhausted"}, []string{"lower_workers 4->2"}, 2, "completed", 0)
	assertComplete(t, tr)
	if !strings.Contains(o.acts[0]["reason"].(string), "/dev/shm") {
		t.Fatalf("the reason should say how to enlarge /dev/shm: %v", o.acts[0]["reason"])
	}
	second := o.starts[1]
	if envOf(second)["nnUNet_n_proc_DA"] != "2" || num(second["n_proc_da"]) != 2 {
		t.Fatalf("second attempt %v: want nnUNet_n_proc_DA=2", second)
	}
	if a := argvOf(second); !hasArg(a, "--c") || num(second["batch_size"]) != 2 {
		t.Fatalf("second attempt should resume with --c at the same batch size: %q %v", a, second)
	}
}

func TestClassValidationExportRerunsValidationOnly(t *testing.T) {
	t.Parallel()
	tr := mkTree(t, 2)
	o := supervise(t, tr, simKnobs(map[string]string{
		"NNGUARD_SIM_FAIL": "validation_export", "NNGUARD_SIM_EXPORT_PROCS_OK": "2",
	}))
	o.wantFlow(t, []string{"validation_export", "validation_export"},
		[]string{"rerun_validation 8->4", "rerun_validation 4->2"}, 3, "completed", 0)
	assertComplete(t, tr)
	if a := argvOf(o.starts[0]); hasArg(a, "--val") {
		t.Fatalf("the first attempt trains: %q", a)
	}
	for i, want := range map[int]string{1: "4", 2: "2"} {
		s := o.starts[i]
		a := argvOf(s)
		if !hasArg(a, "--val") || hasArg(a, "--c") {
			t.Fatalf("attempt %d argv %q: want --val and no --c\n%s", i+1, a, o.dump())
		}
		if envOf(s)["nnUNet_def_n_proc"] != want || s["validation_only"] != true {
			t.Fatalf("attempt %d: want nnUNet_def_n_proc=%s, validation only: %v", i+1, want, s)
		}
	}
	// the rerun validations did not train again
	if n := strings.Count(o.out, "Training done."); n != 1 {
		t.Fatalf("the trainer trained %d times, want once\n%s", n, o.dump())
	}
}

func TestClassCUDAAssertGivesUp(t *testing.T) {
	t.Parallel()
	tr := mkTree(t, 2)
	o := supervise(t, tr, simKnobs(map[string]string{"NNGUARD_SIM_FAIL": "cuda_assert", "NNGUARD_SIM_FAIL_EPOCH": "1"}))
	o.wantFlow(t, []string{"cuda_error"}, []string{"give_up"}, 1, "gave_up", 3)
	if r := o.runEnd["reason"].(string); !strings.Contains(r, "label") {
		t.Fatalf("the reason should point at the labels: %q", r)
	}
}

func TestClassCUDAIllegalAccessRestartsOnce(t *testing.T) {
	t.Parallel()
	tr := mkTree(t, 2)
	o := supervise(t, tr, simKnobs(map[string]string{
		"NNGUARD_SIM_FAIL": "cuda_illegal", "NNGUARD_SIM_FAIL_EPOCH": "2", "NNGUARD_SIM_ONCE_FILE": onceFile(t),
	}))
	o.wantFlow(t, []string{"cuda_error"}, []string{"restart"}, 2, "completed", 0)
	assertComplete(t, tr)
	second := o.starts[1]
	if a := argvOf(second); !hasArg(a, "--c") || num(second["resume_epoch"]) < 2 {
		t.Fatalf("second attempt should resume with --c from epoch >= 2: %q %v", a, second)
	}
	// a restart changes nothing
	if e1, e2 := envOf(o.starts[0]), envOf(second); jsonString(e1) != jsonString(e2) || num(second["batch_size"]) != 2 {
		t.Fatalf("restart changed the settings: %v -> %v", e1, e2)
	}
}

func TestClassCompileErrorDisablesCompile(t *testing.T) {
	t.Parallel()
	tr := mkTree(t, 2)
	o := supervise(t, tr, simKnobs(map[string]string{"NNGUARD_SIM_FAIL": "compile_error"}))
	o.wantFlow(t, []string{"compile_error"}, []string{"disable_compile ->f"}, 2, "completed", 0)
	assertComplete(t, tr)
	if _, ok := envOf(o.starts[0])["nnUNet_compile"]; ok {
		t.Fatalf("first attempt should not set nnUNet_compile: %v", envOf(o.starts[0]))
	}
	if v := envOf(o.starts[1])["nnUNet_compile"]; v != "f" {
		t.Fatalf("second attempt env nnUNet_compile=%v, want f", v)
	}
}

func TestClassNaNLossStopsTheRun(t *testing.T) {
	t.Parallel()
	tr := mkTree(t, 2)
	// 1000 epochs of 0.15 s: the simulated training would take 150 s.
	o := supervise(t, tr, simKnobs(map[string]string{"NNGUARD_SIM_FAIL": "nan_loss", "NNGUARD_SIM_EPOCHS": "1000"}),
		"--grace", "1s", "4", "3d_fullres", "0")
	o.wantFlow(t, []string{"nan_loss"}, []string{"give_up"}, 1, "gave_up", 3)
	if o.duration > 60*time.Second {
		t.Fatalf("the NaN run took %s: nnguard should stop it after a few NaN epochs", o.duration)
	}
	if len(filter(o.evs, "fatal_seen")) != 1 {
		t.Fatalf("want a fatal_seen event while the trainer kept training\n%s", o.dump())
	}
	end := filter(o.evs, "attempt_end")[0]
	if end["signal"] != "SIGTERM" && end["signal"] != "SIGKILL" {
		t.Fatalf("the trainer should have been stopped by nnguard: %v", end)
	}
	if ep := num(end["epoch"]); ep > 20 {
		t.Fatalf("stopped only at epoch %d", ep)
	}
	if _, err := os.Stat(filepath.Join(tr.fold(), "checkpoint_final.pth")); err == nil {
		t.Fatal("a NaN run reached checkpoint_final.pth")
	}
}

func TestClassDiskFullGivesUpDeletesNothing(t *testing.T) {
	t.Parallel()
	tr := mkTree(t, 2)
	o := supervise(t, tr, simKnobs(map[string]string{"NNGUARD_SIM_FAIL": "disk_full"}))
	o.wantFlow(t, []string{"disk_full"}, []string{"give_up"}, 1, "gave_up", 3)
	if r := o.runEnd["reason"].(string); !strings.Contains(r, "nothing was deleted") {
		t.Fatalf("reason %q", r)
	}
	// the half-written checkpoint is still there, and nothing was moved aside
	if _, err := os.Stat(filepath.Join(tr.fold(), "checkpoint_best.pth")); err != nil {
		t.Fatalf("the checkpoint the trainer was writing is gone: %v", err)
	}
	if n := len(filter(o.evs, "checkpoint_moved")); n != 0 {
		t.Fatalf("%d checkpoints moved after a disk-full failure", n)
	}
}

func TestClassWorkerExceptionRestartsOnceThenGivesUp(t *testing.T) {
	t.Parallel()
	tr := mkTree(t, 2)
	o := supervise(t, tr, simKnobs(map[string]string{
		"NNGUARD_SIM_WORKER_EXCEPTION_AT_EPOCH": "1", "NNGUARD_SIM_WORKER_EXCEPTION_KIND": "io",
	}))
	o.wantFlow(t, []string{"worker_error", "worker_error"}, []string{"restart", "give_up"}, 2, "gave_up", 3)
	// the simulator's io error names <nnUNet_preprocessed>/Dataset004_Hippocampus/<data_identifier>/<case>.pkl
	file, _ := o.fails[0]["file"].(string)
	if !strings.HasPrefix(file, filepath.Join(tr.pre, "Dataset004_Hippocampus")+"/") || !strings.HasSuffix(file, ".pkl") {
		t.Fatalf("failure file %q: want the preprocessed .pkl the worker failed on\n%s", file, o.dump())
	}
	r := o.runEnd["reason"].(string)
	if !strings.Contains(r, file) || !strings.Contains(r, "worker") {
		t.Fatalf("give-up reason %q should name the file %s", r, file)
	}
	if !hasArg(argvOf(o.starts[1]), "--c") {
		t.Fatalf("the restart should resume: %q", argvOf(o.starts[1]))
	}
}

func TestClassUnknownCrashOnceRestarts(t *testing.T) {
	t.Parallel()
	tr := mkTree(t, 2)
	o := supervise(t, tr, simKnobs(map[string]string{"NNGUARD_SIM_CRASH_AT_EPOCH": "2", "NNGUARD_SIM_ONCE_FILE": onceFile(t)}))
	o.wantFlow(t, []string{"unknown"}, []string{"restart"}, 2, "completed", 0)
	assertComplete(t, tr)
	if r := o.fails[0]["reason"].(string); !strings.Contains(r, "IndexError") {
		t.Fatalf("the unknown failure should quote the exception: %q", r)
	}
	if a := argvOf(o.starts[1]); !hasArg(a, "--c") {
		t.Fatalf("second attempt argv %q lacks --c", a)
	}
}

func TestClassUnknownCrashLoopGivesUp(t *testing.T) {
	t.Parallel()
	tr := mkTree(t, 2)
	// A trainer that dies in its startup with an unrecognisable exception,
	// every time: no epoch, no checkpoint, the same settings: a crash loop.
	// (nnguard refuses --disable_checkpointing, so the simulator's crash,
	// which comes after an epoch's checkpoint_best.pth save, always makes
	// progress; see the test below.)
	crash := filepath.Join(t.TempDir(), "crash.py")
	os.WriteFile(crash, []byte("import sys\nprint('Using device: cuda:0', flush=True)\n[][1]\n"), 0o644)
	o := supervise(t, tr, simKnobs(nil), "--trainer-cmd", "python3 "+crash, "4", "3d_fullres", "0")
	o.wantFlow(t, []string{"unknown", "unknown"}, []string{"restart", "give_up"}, 2, "gave_up", 3)
	if r := o.runEnd["reason"].(string); !strings.Contains(r, "crash loop") {
		t.Fatalf("give-up reason %q should say crash loop\n%s", r, o.dump())
	}
	for _, s := range o.starts {
		if a := argvOf(s); hasArg(a, "--c") {
			t.Fatalf("argv %q: there is nothing to resume from", a)
		}
	}
}

func TestClassUnknownCrashWithProgressKeepsRestarting(t *testing.T) {
	t.Parallel()
	tr := mkTree(t, 2)
	// A crash at every epoch >= 2, but each attempt gets one epoch further
	// (checkpoint_best.pth is saved before the crash): progress, so no crash
	// loop; --max-restarts bounds it.
	o := supervise(t, tr, simKnobs(map[string]string{"NNGUARD_SIM_CRASH_AT_EPOCH": "2", "NNGUARD_SIM_EPOCHS": "20"}),
		"--max-restarts", "2", "4", "3d_fullres", "0")
	o.wantFlow(t, []string{"unknown", "unknown", "unknown"}, []string{"restart", "restart", "give_up"}, 3, "gave_up", 3)
	if r := o.runEnd["reason"].(string); !strings.Contains(r, "--max-restarts=2") || strings.Contains(r, "crash loop") {
		t.Fatalf("reason %q", r)
	}
	prev := 2
	for i, s := range o.starts[1:] {
		if !hasArg(argvOf(s), "--c") || num(s["resume_epoch"]) <= prev {
			t.Fatalf("attempt %d %v: want --c from an epoch after %d\n%s", i+2, s, prev, o.dump())
		}
		prev = num(s["resume_epoch"])
	}
}

func TestClassConfigWeightsOnlyGivesUp(t *testing.T) {
	t.Parallel()
	tr := mkTree(t, 2)
	// a crash makes nnguard restart with --c; loading the checkpoint then
	// fails with torch 2.6's weights_only error
	o := supervise(t, tr, simKnobs(map[string]string{
		"NNGUARD_SIM_FAIL": "config_weights_only", "NNGUARD_SIM_CRASH_AT_EPOCH": "2", "NNGUARD_SIM_ONCE_FILE": onceFile(t),
	}))
	o.wantFlow(t, []string{"unknown", "config_error"}, []string{"restart", "give_up"}, 2, "gave_up", 3)
	if a := argvOf(o.starts[1]); !hasArg(a, "--c") {
		t.Fatalf("second attempt argv %q lacks --c", a)
	}
	if r := o.runEnd["reason"].(string); !strings.Contains(r, "configuration error") {
		t.Fatalf("reason %q", r)
	}
}

func TestClassFragmentedOOMSetsAllocatorFirst(t *testing.T) {
	t.Parallel()
	tr := mkTree(t, 4)
	// need 2000 + 4*1000 = 6000 MiB of 8192; 35% fragmentation pushes it over
	o := supervise(t, tr, simKnobs(map[string]string{
		"NNGUARD_SIM_GPU_MIB": "8192", "NNGUARD_SIM_BASE_MIB": "2000", "NNGUARD_SIM_SAMPLE_MIB": "1000",
		"NNGUARD_SIM_FRAGMENTED": "1", "NNGUARD_SIM_OOM_FROM_EPOCH": "1",
	}))
	o.wantFlow(t, []string{"gpu_oom"}, []string{"set_allocator ->expandable_segments:True"}, 2, "completed", 0)
	assertComplete(t, tr)
	first, second := o.starts[0], o.starts[1]
	if _, ok := envOf(first)["PYTORCH_CUDA_ALLOC_CONF"]; ok {
		t.Fatalf("first attempt env %v", envOf(first))
	}
	if v := envOf(second)["PYTORCH_CUDA_ALLOC_CONF"]; v != "expandable_segments:True" {
		t.Fatalf("second attempt PYTORCH_CUDA_ALLOC_CONF=%v", v)
	}
	if num(second["batch_size"]) != 4 || strings.Contains(argvOf(second), "nnguard_") || len(filter(o.evs, "derived_plans")) != 0 {
		t.Fatalf("the batch size should be unchanged: %v", second)
	}
	if !hasArg(argvOf(second), "--c") {
		t.Fatalf("second attempt argv %q lacks --c", argvOf(second))
	}
}

func TestClassMaxRestartsGivesUp(t *testing.T) {
	t.Parallel()
	tr := mkTree(t, 2)
	// shm_exhausted at 8 workers needs 8 -> 4 -> 2: two restarts
	o := supervise(t, tr, simKnobs(map[string]string{
		"NNGUARD_SIM_FAIL": "shm_exhausted", "NNGUARD_SIM_SHM_WORKERS": "2", "nnUNet_n_proc_DA": "8",
	}), "--max-restarts", "1", "4", "3d_fullres", "0")
	o.wantFlow(t, []string{"shm_exhausted", "shm_exhausted"}, []string{"lower_workers 8->4", "give_up"}, 2, "gave_up", 3)
	if r := o.runEnd["reason"].(string); !strings.Contains(r, "--max-restarts=1") {
		t.Fatalf("reason %q should name --max-restarts", r)
	}
}
