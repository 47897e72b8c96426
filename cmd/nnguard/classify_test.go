package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// `nnguard classify`, `doctor`, `version` and the help texts, run as the
// built binary.

// corpusDir finds the shared transcript corpus (shared/corpus next to the
// repository, or inside it on machines that carry it there).
func corpusDir(t *testing.T) string {
	t.Helper()
	for _, rel := range []string{"../shared/corpus", "shared/corpus"} {
		d := repoPath(t, rel)
		if st, err := os.Stat(filepath.Join(d, "nnunet-cpu", "a_clean.log")); err == nil && !st.IsDir() {
			return d
		}
	}
	t.Skip("shared/corpus not found")
	return ""
}

// transcript returns a corpus file's text; for corpus/real files the header
// (up to the first "---" line) is stripped, because it names the cause.
func transcript(t *testing.T, rel string) []byte {
	t.Helper()
	b := readFile(t, filepath.Join(corpusDir(t), rel))
	if strings.HasPrefix(rel, "real/") {
		i := bytes.Index(b, []byte("\n---\n"))
		if i < 0 {
			t.Fatalf("%s: no --- line after the header", rel)
		}
		b = b[i+len("\n---\n"):]
	}
	return b
}

// logCopy writes a transcript to a file in t.TempDir() and returns its path.
func logCopy(t *testing.T, rel string) (string, []byte) {
	t.Helper()
	b := transcript(t, rel)
	p := filepath.Join(t.TempDir(), strings.TrimSuffix(filepath.Base(rel), filepath.Ext(rel))+".log")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p, b
}

// runBin runs the nnguard binary with stdin and returns its exit code,
// stdout and stderr.
func runBin(t *testing.T, stdin []byte, env []string, args ...string) (int, string, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, nnguardBin, args...)
	if env == nil {
		env = os.Environ()
	}
	// the binary is built with -race, whose runtime sleeps 1 s at exit
	cmd.Env = append(env, "GORACE=atexit_sleep_ms=0")
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if ctx.Err() != nil {
		t.Fatalf("nnguard %v did not finish: %v", args, ctx.Err())
	}
	if err != nil {
		if _, ok := err.(*exec.ExitError); !ok {
			t.Fatalf("nnguard %v: %v", args, err)
		}
	}
	return cmd.ProcessState.ExitCode(), out.String(), errb.String()
}

type classified struct {
	File     string         `json:"file"`
	Class    string         `json:"class"`
	Action   string         `json:"action"`
	Reason   string         `json:"reason"`
	Advice   string         `json:"advice"`
	Evidence []evidenceLine `json:"evidence"`
}

type evidenceLine struct {
	Line int    `json:"line"`
	Text string `json:"text"`
}

// decodeStrict parses one `classify --json` line and checks its exact keys.
func decodeStrict(t *testing.T, line string) classified {
	t.Helper()
	var raw map[string]json.RawMessage
	if err := json.Unmarshal([]byte(line), &raw); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, line)
	}
	var keys []string
	for k := range raw {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	want := []string{"action", "class", "evidence", "file", "reason"}
	if _, ok := raw["advice"]; ok {
		want = []string{"action", "advice", "class", "evidence", "file", "reason"}
	}
	if !slices.Equal(keys, want) {
		t.Fatalf("keys %v, want %v\n%s", keys, want, line)
	}
	if string(raw["evidence"]) == "null" {
		t.Fatalf("evidence is null, want a list: %s", line)
	}
	var evs []map[string]json.RawMessage
	if err := json.Unmarshal(raw["evidence"], &evs); err != nil {
		t.Fatalf("evidence: %v", err)
	}
	for _, e := range evs {
		if len(e) != 2 || e["line"] == nil || e["text"] == nil {
			t.Fatalf("evidence item %v: want exactly line and text", e)
		}
	}
	var c classified
	if err := json.Unmarshal([]byte(line), &c); err != nil {
		t.Fatal(err)
	}
	return c
}

// inputLines splits a log the way a reader counts lines (1-based).
func inputLines(b []byte) []string {
	return strings.Split(string(b), "\n")
}

// checkEvidence: every evidence line number points at that line of the input.
func checkEvidence(t *testing.T, c classified, in []byte) {
	t.Helper()
	lines := inputLines(in)
	prev := 0
	for _, e := range c.Evidence {
		if e.Line <= prev || e.Line > len(lines) {
			t.Fatalf("evidence line %d out of order or past the end (%d lines): %+v", e.Line, len(lines), c.Evidence)
		}
		prev = e.Line
		got := strings.TrimRight(lines[e.Line-1], " \r")
		if got != strings.TrimRight(e.Text, " \r") {
			t.Fatalf("evidence line %d says %q, the input line is %q", e.Line, e.Text, got)
		}
	}
}

var classifyCases = []struct {
	rel            string
	class, action  string
	evidenceSubstr string // one evidence line contains this
}{
	{"nnunet-cpu/a_clean.log", "none", "none", ""},
	{"nnunet-cpu/c_fake_oom.log", "gpu_oom", "lower_batch_size", "CUDA out of memory. Tried to allocate 2.00 GiB"},
	{"nnunet-cpu/b_kill_train_worker.log", "host_oom", "lower_workers", "One or more background workers are no longer alive"},
	{"nnunet-cpu/x_worker_exception_at_startup.log", "worker_error", "restart", "Exception in background worker 0:"},
	{"real/024-shm-exhausted-v2-nomad-1411.txt", "shm_exhausted", "lower_workers", ""},
	{"real/032-cuda-other-v1-device-assert-backward-139.txt", "cuda_error", "give_up", "device-side assert"},
	{"real/039-nan-loss-v2-png-epoch0-1612.txt", "nan_loss", "give_up", "loss nan"},
	{"real/047-config-error-v2-trainer-class-not-found-2345.txt", "config_error", "give_up", ""},
	{"real/019-worker-death-other-v2-mmap-unpacking-2581.txt", "worker_error", "restart", "mmap length is greater than file size"},
}

func TestClassifyJSONOnCorpus(t *testing.T) {
	t.Parallel()
	for _, tc := range classifyCases {
		t.Run(filepath.Base(tc.rel), func(t *testing.T) {
			p, in := logCopy(t, tc.rel)
			code, out, errs := runBin(t, nil, nil, "classify", "--json", p)
			if code != 0 || errs != "" {
				t.Fatalf("exit %d, stderr %q", code, errs)
			}
			lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
			if len(lines) != 1 {
				t.Fatalf("want one JSON line, got %d:\n%s", len(lines), out)
			}
			c := decodeStrict(t, lines[0])
			if c.File != p || c.Class != tc.class || c.Action != tc.action || c.Reason == "" {
				t.Fatalf("got %+v, want class %s action %s", c, tc.class, tc.action)
			}
			checkEvidence(t, c, in)
			if tc.class == "none" {
				if len(c.Evidence) != 0 || c.Advice != "" {
					t.Fatalf("a clean log has evidence or advice: %+v", c)
				}
				return
			}
			if len(c.Evidence) == 0 || c.Advice == "" {
				t.Fatalf("a failure without evidence or advice: %+v", c)
			}
			if tc.evidenceSubstr != "" && !slices.ContainsFunc(c.Evidence, func(e evidenceLine) bool {
				return strings.Contains(e.Text, tc.evidenceSubstr)
			}) {
				t.Fatalf("no evidence line contains %q: %+v", tc.evidenceSubstr, c.Evidence)
			}
		})
	}
}

var evidenceRe = regexp.MustCompile(`^  +([0-9]+): (.*)$`)

func TestClassifyTextOnCorpus(t *testing.T) {
	t.Parallel()
	for _, tc := range classifyCases {
		t.Run(filepath.Base(tc.rel), func(t *testing.T) {
			p, in := logCopy(t, tc.rel)
			code, out, errs := runBin(t, nil, nil, "classify", p)
			if code != 0 || errs != "" {
				t.Fatalf("exit %d, stderr %q", code, errs)
			}
			lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
			if len(lines) < 3 || lines[0] != p+": "+tc.class || lines[1] != "  action: "+tc.action || !strings.HasPrefix(lines[2], "  reason: ") {
				t.Fatalf("want %q, action %q and a reason first, got:\n%s", p+": "+tc.class, tc.action, out)
			}
			rest := lines[3:]
			if tc.class != "none" {
				if len(rest) == 0 || !strings.HasPrefix(rest[0], "  nnguard would: ") {
					t.Fatalf("no 'nnguard would:' line:\n%s", out)
				}
				rest = rest[1:]
			}
			src := inputLines(in)
			for _, l := range rest {
				m := evidenceRe.FindStringSubmatch(l)
				if m == nil {
					t.Fatalf("unexpected line %q in:\n%s", l, out)
				}
				n, err := strconv.Atoi(m[1])
				if err != nil || n < 1 || n > len(src) {
					t.Fatalf("bad evidence line number in %q", l)
				}
				if want := strings.TrimRight(src[n-1], " \r"); m[2] != want {
					t.Fatalf("evidence %d: %q, the input line is %q", n, m[2], want)
				}
			}
			if (tc.class == "none") != (len(rest) == 0) {
				t.Fatalf("evidence lines %d for class %s:\n%s", len(rest), tc.class, out)
			}
		})
	}
}

func TestClassifyStdin(t *testing.T) {
	t.Parallel()
	in := transcript(t, "nnunet-cpu/c_fake_oom.log")
	code, out, errs := runBin(t, in, nil, "classify", "--json", "-")
	if code != 0 || errs != "" {
		t.Fatalf("exit %d, stderr %q", code, errs)
	}
	c := decodeStrict(t, strings.TrimSpace(out))
	if c.File != "-" || c.Class != "gpu_oom" || c.Action != "lower_batch_size" {
		t.Fatalf("%+v", c)
	}
	checkEvidence(t, c, in)

	code, out, _ = runBin(t, transcript(t, "real/039-nan-loss-v2-png-epoch0-1612.txt"), nil, "classify", "-")
	if code != 0 || !strings.HasPrefix(out, "-: nan_loss\n") {
		t.Fatalf("exit %d:\n%s", code, out)
	}
}

func TestClassifySeveralFiles(t *testing.T) {
	t.Parallel()
	var paths []string
	var ins [][]byte
	want := []string{"none", "gpu_oom", "host_oom", "worker_error"}
	for _, rel := range []string{"nnunet-cpu/a_clean.log", "nnunet-cpu/c_fake_oom.log", "nnunet-cpu/b_kill_train_worker.log", "real/019-worker-death-other-v2-mmap-unpacking-2581.txt"} {
		p, in := logCopy(t, rel)
		paths = append(paths, p)
		ins = append(ins, in)
	}
	code, out, errs := runBin(t, nil, nil, append([]string{"classify", "--json"}, paths...)...)
	if code != 0 || errs != "" {
		t.Fatalf("exit %d, stderr %q", code, errs)
	}
	lines := strings.Split(strings.TrimRight(out, "\n"), "\n")
	if len(lines) != len(paths) {
		t.Fatalf("want %d JSON lines, got:\n%s", len(paths), out)
	}
	for i, l := range lines {
		c := decodeStrict(t, l)
		if c.File != paths[i] || c.Class != want[i] {
			t.Fatalf("line %d: %+v, want %s for %s", i, c, want[i], paths[i])
		}
		checkEvidence(t, c, ins[i])
	}
	// text: one block per file, in order
	code, out, _ = runBin(t, nil, nil, append([]string{"classify"}, paths...)...)
	if code != 0 {
		t.Fatalf("exit %d", code)
	}
	var heads []string
	for _, l := range strings.Split(out, "\n") {
		if l != "" && !strings.HasPrefix(l, " ") {
			heads = append(heads, l)
		}
	}
	for i := range paths {
		heads[i] = strings.TrimPrefix(heads[i], paths[i]+": ")
	}
	if !slices.Equal(heads, want) {
		t.Fatalf("text blocks %v, want %v:\n%s", heads, want, out)
	}
}

func TestClassifyMissingFileExits2(t *testing.T) {
	t.Parallel()
	missing := filepath.Join(t.TempDir(), "no-such.log")
	code, out, errs := runBin(t, nil, nil, "classify", missing)
	if code != 2 || out != "" {
		t.Fatalf("exit %d, stdout %q", code, out)
	}
	if lines := strings.Split(strings.TrimRight(errs, "\n"), "\n"); len(lines) != 1 || !strings.Contains(errs, missing) {
		t.Fatalf("want one line naming %s on stderr, got %q", missing, errs)
	}
	code, _, errs = runBin(t, nil, nil, "classify")
	if code != 2 || !strings.Contains(errs, "usage") {
		t.Fatalf("no file: exit %d, stderr %q", code, errs)
	}
}

// Two trainer runs in one log (a job script that trains fold after fold, a
// Slurm file appended to): the first completes its final validation, the
// second dies of a CUDA OOM in its first training step. The OOM is a
// training OOM, not one "while predicting a case in the final validation".
func TestClassifyOOMInARunAfterACompleteRunIsATrainingOOM(t *testing.T) {
	t.Parallel()
	clean := transcript(t, "nnunet-cpu/a_clean.log")
	oom := transcript(t, "nnunet-cpu/c_fake_oom.log")
	in := append(append([]byte{}, clean...), oom...)
	code, out, _ := runBin(t, in, nil, "classify", "--json", "-")
	if code != 0 {
		t.Fatalf("exit %d", code)
	}
	c := decodeStrict(t, strings.TrimSpace(out))
	checkEvidence(t, c, in)
	if c.Class != "gpu_oom" || c.Action != "lower_batch_size" {
		t.Fatalf("%+v", c)
	}
	if strings.Contains(c.Reason, "validation") {
		t.Fatalf("the OOM happened in the second run's training step (after its 'Epoch 0'), but the reason says: %q", c.Reason)
	}
}

func TestClassifyLargeFileBoundedMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("writes and classifies a 200 MB log")
	}
	clean := transcript(t, "nnunet-cpu/a_clean.log")
	oomLog := transcript(t, "nnunet-cpu/c_fake_oom.log")
	// the OOM traceback of c_fake_oom.log: from its last "Traceback" line
	// before the OutOfMemoryError through that line
	ol := inputLines(oomLog)
	end := slices.IndexFunc(ol, func(s string) bool { return strings.Contains(s, "OutOfMemoryError: CUDA out of memory") })
	if end < 0 {
		t.Fatal("no OOM line in c_fake_oom.log")
	}
	start := end
	for start > 0 && !strings.HasPrefix(ol[start], "Traceback (most recent call last):") {
		start--
	}
	tb := strings.Join(ol[start:end+1], "\n") + "\n"

	p := filepath.Join(t.TempDir(), "big.log")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	w := bufio.NewWriterSize(f, 1<<20)
	var size int64
	lines := 0
	n := bytes.Count(clean, []byte("\n"))
	if !bytes.HasSuffix(clean, []byte("\n")) {
		t.Fatal("a_clean.log does not end with a newline")
	}
	for size < 200<<20 {
		w.Write(clean)
		size += int64(len(clean))
		lines += n
	}
	w.WriteString(tb)
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	oomLine := lines + (end - start) + 1

	cmd := exec.Command(nnguardBin, "classify", "--json", p)
	cmd.Env = append(os.Environ(), "GORACE=atexit_sleep_ms=0")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	t0 := time.Now()
	if err := cmd.Run(); err != nil {
		t.Fatalf("%v: %s", err, errb.String())
	}
	c := decodeStrict(t, strings.TrimSpace(out.String()))
	if c.Class != "gpu_oom" || c.Action != "lower_batch_size" {
		t.Fatalf("%+v", c)
	}
	if !slices.ContainsFunc(c.Evidence, func(e evidenceLine) bool {
		return e.Line == oomLine && strings.Contains(e.Text, "CUDA out of memory")
	}) {
		t.Fatalf("want the OOM at line %d in the evidence: %+v", oomLine, c.Evidence)
	}
	ru, ok := cmd.ProcessState.SysUsage().(*syscall.Rusage)
	if !ok {
		t.Fatal("no rusage")
	}
	maxRSS := ru.Maxrss << 10 // KiB on Linux
	t.Logf("classified %d MiB (%d lines) in %s, peak RSS %d MiB", size>>20, oomLine, time.Since(t0).Round(time.Millisecond), maxRSS>>20)
	if maxRSS >= 100<<20 {
		t.Fatalf("peak RSS %d MiB classifying a %d MiB log: classify should stream", maxRSS>>20, size>>20)
	}
}

// cleanEnv is the environment without nnU-Net's variables, nnguard's and
// with a PATH without nnUNetv2_train.
func cleanEnv(t *testing.T) []string {
	t.Helper()
	var env []string
	for _, kv := range os.Environ() {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, "nnUNet_") || strings.HasPrefix(k, "NNGUARD_") || k == "PATH" {
			continue
		}
		env = append(env, kv)
	}
	var path []string
	for _, d := range filepath.SplitList(os.Getenv("PATH")) {
		if _, err := os.Stat(filepath.Join(d, "nnUNetv2_train")); err == nil {
			continue
		}
		path = append(path, d)
	}
	return append(env, "PATH="+strings.Join(path, string(filepath.ListSeparator)))
}

// noGPU: this machine has no NVIDIA driver (the GPU assertions only hold there).
func noGPU() bool {
	_, err := os.Stat("/dev/nvidiactl")
	return err != nil
}

func TestDoctorWithoutGPUAndNNUNet(t *testing.T) {
	t.Parallel()
	env := cleanEnv(t)
	code, out, _ := runBin(t, nil, env, "doctor")
	if code != 1 {
		t.Fatalf("doctor: exit %d, want 1 (problems)\n%s", code, out)
	}
	for _, want := range []string{"Problems:", "nnUNet_results is not set", "nnUNetv2_train", "NOT OK"} {
		if !strings.Contains(out, want) {
			t.Fatalf("doctor output lacks %q:\n%s", want, out)
		}
	}
	if noGPU() && (!strings.Contains(out, "monitoring off") || !strings.Contains(out, "ERROR_LIBRARY_NOT_FOUND")) {
		t.Fatalf("doctor should say GPU monitoring is off (ERROR_LIBRARY_NOT_FOUND):\n%s", out)
	}

	code, out, _ = runBin(t, nil, env, "doctor", "--json")
	if code != 1 {
		t.Fatalf("doctor --json: exit %d, want 1\n%s", code, out)
	}
	var rep map[string]any
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("doctor --json is not one JSON object: %v\n%s", err, out)
	}
	probs, ok := rep["problems"].([]any)
	if !ok || len(probs) == 0 {
		t.Fatalf("problems %v", rep["problems"])
	}
	if _, ok := rep["gpu_off"]; !ok {
		t.Fatalf("no gpu_off key: %v", rep)
	}
	if off, _ := rep["gpu_off"].(string); noGPU() && !strings.Contains(off, "ERROR_LIBRARY_NOT_FOUND") {
		t.Fatalf("gpu_off %q", off)
	}
	joined := jsonString(probs)
	if !strings.Contains(joined, "nnUNet_results") || !strings.Contains(joined, "nnUNetv2_train") {
		t.Fatalf("problems %s", joined)
	}
}

func TestVersionAndHelp(t *testing.T) {
	t.Parallel()
	code, out, _ := runBin(t, nil, nil, "version")
	if code != 0 || !regexp.MustCompile(`^nnguard \S+\n$`).MatchString(out) {
		t.Fatalf("version: exit %d %q", code, out)
	}
	code, out, _ = runBin(t, nil, nil, "--help")
	if code != 0 {
		t.Fatalf("--help: exit %d", code)
	}
	for _, want := range []string{"Exit codes", "3 gave up", "5 GPU fault", "130/143", "train", "classify", "doctor"} {
		if !strings.Contains(out, want) {
			t.Fatalf("--help lacks %q:\n%s", want, out)
		}
	}
	code, out, _ = runBin(t, nil, nil, "train", "--help")
	if code != 0 {
		t.Fatalf("train --help: exit %d", code)
	}
	for _, want := range []string{"DATASET CONFIGURATION FOLD", "--max-restarts", "--trainer-cmd", "--c"} {
		if !strings.Contains(out, want) {
			t.Fatalf("train --help lacks %q:\n%s", want, out)
		}
	}
}

// A missing file among several is reported, the others are still classified.
func TestClassifyMissingFileAmongOthers(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	a := filepath.Join(dir, "a.log")
	b := filepath.Join(dir, "b.log")
	os.WriteFile(a, transcript(t, "nnunet-cpu/c_fake_oom.log"), 0o644)
	os.WriteFile(b, transcript(t, "nnunet-cpu/b_kill_train_worker.log"), 0o644)
	missing := filepath.Join(dir, "missing.log")
	code, out, errs := runBin(t, nil, nil, "classify", "--json", a, missing, b)
	if code != 2 || !strings.Contains(errs, missing) {
		t.Fatalf("exit %d, stderr %q", code, errs)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) != 2 || !strings.Contains(lines[0], `"gpu_oom"`) || !strings.Contains(lines[1], `"host_oom"`) {
		t.Fatalf("stdout %q", out)
	}
}
