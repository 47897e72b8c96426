package nnunet

import (
	"archive/zip"
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const fixtures = "../../shared/fixtures/checkpoints"

func fixture(t testing.TB, name string) string {
	t.Helper()
	p := filepath.Join(fixtures, name)
	if _, err := os.Stat(p); err != nil {
		t.Skipf("fixture %s not available: %v", p, err)
	}
	return p
}

func TestInspectFixtures(t *testing.T) {
	for _, tc := range []struct {
		file  string
		valid bool
		epoch int
	}{
		{"checkpoint_best.pth", true, 6},
		{"checkpoint_latest.pth", true, 4},
		{"checkpoint_final.pth", true, 6},
		{"checkpoint_latest_truncated.pth", false, -1},
	} {
		t.Run(tc.file, func(t *testing.T) {
			c := Inspect(fixture(t, tc.file))
			if !c.Exists || c.Valid != tc.valid || c.Epoch != tc.epoch {
				t.Fatalf("Inspect = exists %v valid %v epoch %d err %v; want valid %v epoch %d", c.Exists, c.Valid, c.Epoch, c.Err, tc.valid, tc.epoch)
			}
			if tc.valid && c.Err != nil {
				t.Fatalf("valid checkpoint with error %v", c.Err)
			}
			if !tc.valid && (c.Err == nil || !strings.Contains(c.Err.Error(), "zip")) {
				t.Fatalf("invalid checkpoint error = %v, want a zip error", c.Err)
			}
			if c.Name != tc.file || c.Size == 0 || c.ModTime.IsZero() {
				t.Fatalf("metadata: %+v", c)
			}
		})
	}
}

func TestInspectMissing(t *testing.T) {
	c := Inspect(filepath.Join(t.TempDir(), CheckpointLatest))
	if c.Exists || c.Valid || c.Err != nil || c.Epoch != -1 {
		t.Fatalf("missing: %+v", c)
	}
}

// simPickle is a protocol 2 pickle of {'current_epoch': epoch, 'trainer_name': 'sim'}
// as Python's pickle.dumps(..., protocol=2) writes it.
func simPickle(epoch byte) []byte {
	var b bytes.Buffer
	b.WriteString("\x80\x02}q\x00(X\x0d\x00\x00\x00current_epochq\x01K")
	b.WriteByte(epoch)
	b.WriteString("X\x0c\x00\x00\x00trainer_nameq\x02X\x03\x00\x00\x00simq\x03u.")
	return b.Bytes()
}

// simCheckpoint writes a zip with <stem>/data.pkl as the simulator does.
func simCheckpoint(t testing.TB, path string, epoch byte) {
	t.Helper()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	stem := strings.TrimSuffix(filepath.Base(path), ".pth")
	w, err := zw.Create(stem + "/data.pkl")
	if err != nil {
		t.Fatal(err)
	}
	w.Write(simPickle(epoch))
	w, _ = zw.Create(stem + "/version")
	w.Write([]byte("3\n"))
	if err := zw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestInspectSimulatorCheckpoint(t *testing.T) {
	p := filepath.Join(t.TempDir(), CheckpointLatest)
	simCheckpoint(t, p, 3)
	c := Inspect(p)
	if !c.Valid || c.Epoch != 3 {
		t.Fatalf("sim checkpoint: %+v", c)
	}
}

func TestInspectInvalid(t *testing.T) {
	dir := t.TempDir()
	write := func(name string, files map[string][]byte) string {
		var buf bytes.Buffer
		zw := zip.NewWriter(&buf)
		for n, d := range files {
			w, _ := zw.Create(n)
			w.Write(d)
		}
		zw.Close()
		p := filepath.Join(dir, name)
		os.WriteFile(p, buf.Bytes(), 0o644)
		return p
	}
	cases := map[string]string{
		write("nopkl.pth", map[string][]byte{"x/version": []byte("3")}):                                  "no <name>/data.pkl",
		write("badpkl.pth", map[string][]byte{"x/data.pkl": []byte("\x80\x02}q\x00(X\xff\xff\xff\x7f")}): "truncated pickle",
		write("noepoch.pth", map[string][]byte{"x/data.pkl": []byte("\x80\x02}q\x00.")}):                 "no current_epoch",
		write("list.pth", map[string][]byte{"x/data.pkl": []byte("\x80\x02]q\x00.")}):                    "not a dict",
	}
	empty := filepath.Join(dir, "empty.pth")
	os.WriteFile(empty, nil, 0o644)
	cases[empty] = "zip"
	os.Mkdir(filepath.Join(dir, "dir.pth"), 0o755)
	cases[filepath.Join(dir, "dir.pth")] = "not a regular file"
	for p, want := range cases {
		c := Inspect(p)
		if !c.Exists || c.Valid || c.Err == nil || !strings.Contains(c.Err.Error(), want) {
			t.Errorf("%s: valid %v err %v; want error containing %q", filepath.Base(p), c.Valid, c.Err, want)
		}
	}
}

func TestInspectMissingStorage(t *testing.T) {
	// A real checkpoint with one tensor storage removed from the archive.
	src, err := zip.OpenReader(fixture(t, "checkpoint_best.pth"))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	for _, f := range src.File {
		if f.Name == "checkpoint_best/data/3" {
			continue
		}
		if err := zw.Copy(f); err != nil {
			t.Fatal(err)
		}
	}
	zw.Close()
	p := filepath.Join(t.TempDir(), "c.pth")
	os.WriteFile(p, buf.Bytes(), 0o644)
	c := Inspect(p)
	if c.Valid || c.Err == nil || !strings.Contains(c.Err.Error(), "data/3 is missing") {
		t.Fatalf("missing storage: valid %v err %v", c.Valid, c.Err)
	}
}

func FuzzInspect(f *testing.F) {
	for _, n := range []string{"checkpoint_best.pth", "checkpoint_latest_truncated.pth"} {
		if b, err := os.ReadFile(filepath.Join(fixtures, n)); err == nil {
			f.Add(b)
		}
	}
	var buf bytes.Buffer
	zw := zip.NewWriter(&buf)
	w, _ := zw.Create("c/data.pkl")
	w.Write(simPickle(2))
	zw.Close()
	f.Add(buf.Bytes())
	f.Add(simPickle(1))
	f.Fuzz(func(t *testing.T, data []byte) {
		start := time.Now()
		readCheckpoint(bytes.NewReader(data), int64(len(data)))
		unpickle(data)
		if d := time.Since(start); d > 2*time.Second {
			t.Fatalf("took %v", d)
		}
	})
}
