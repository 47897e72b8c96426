package logparse

import (
	"bytes"

	"os"
	"strings"
	"sync"
	"testing"
	"unicode/utf8"
)

func FuzzClassify(f *testing.F) {
	for _, name := range []string{"c_fake_oom.log", "x_worker_exception_at_startup.log", "b4_kill_export_pool_worker_during_final_validation.log"} {
		if b, err := os.ReadFile("testdata/" + name); err == nil {
			f.Add(b)
		}
	}
	f.Add([]byte("Exception in background worker 0:\n\xff\nTraceback (most recent call last):\n  File \"x\", line 1, in producer\nValueError: x.npy\n"))
	f.Add([]byte("2026-01-05 09:03:07.1: Epoch 1\r\n2026-01-05 09:03:07.1: train_loss nan\r"))
	f.Fuzz(func(t *testing.T, data []byte) {
		d, err := Classify(bytes.NewReader(data))
		if err != nil {
			t.Fatal(err)
		}
		if d.Class == "" || d.Reason == "" {
			t.Fatalf("empty diagnosis %+v", d)
		}
		if len(d.Evidence) > maxEvidence {
			t.Fatalf("%d evidence lines", len(d.Evidence))
		}
		for _, e := range d.Evidence {
			if len(e.Text) > maxEvidenceText+len("…") || !utf8.ValidString(e.Text) || e.Line < 1 {
				t.Fatalf("bad evidence %d %q", e.Line, e.Text)
			}
		}
		// Feeding the same text line by line with every exit gives no panic.
		p := NewParser()
		for _, l := range strings.Split(string(data), "\n") {
			p.Feed(l)
		}
		for _, x := range []Exit{{}, {Known: true}, {Known: true, Code: 1}, {Known: true, Signal: "SIGKILL"}} {
			if d := p.Diagnose(x); len(d.Evidence) > maxEvidence {
				t.Fatal("evidence")
			}
		}
	})
}

var (
	benchOnce sync.Once
	benchLog  []byte
)

// syntheticLog repeats the epoch lines of a_clean.log to about 64 MiB and
// ends with c_fake_oom.log's traceback: the shape of a long run that dies.
func syntheticLog(tb testing.TB) []byte {
	benchOnce.Do(func() {
		clean := string(mustReadTB(tb, "testdata/../"+cpuCorpus+"/a_clean.log"))
		i := strings.Index(clean, ": Epoch 0\n")
		i = strings.LastIndexByte(clean[:i], '\n') + 1
		j := strings.Index(clean, "Training done.")
		j = strings.LastIndexByte(clean[:j], '\n') + 1
		head, block := clean[:i], clean[i:j]
		oom := string(mustReadTB(tb, "testdata/c_fake_oom.log"))
		k := strings.Index(oom, "Traceback (most recent call last)")
		var b bytes.Buffer
		b.WriteString(head)
		for b.Len() < 64<<20 {
			b.WriteString(block)
		}
		b.WriteString(oom[k:])
		benchLog = b.Bytes()
	})
	return benchLog
}

func mustReadTB(tb testing.TB, path string) []byte {
	b, err := os.ReadFile(path)
	if err != nil {
		tb.Fatal(err)
	}
	return b
}

// TestWriteBenchLog writes the benchmark's log to $NNGUARD_BENCH_LOG, to time
// grep -F -f logparse/patterns.txt on the same bytes (make bench).
func TestWriteBenchLog(t *testing.T) {
	path := os.Getenv("NNGUARD_BENCH_LOG")
	if path == "" {
		t.Skip("NNGUARD_BENCH_LOG not set")
	}
	if err := os.WriteFile(path, syntheticLog(t), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestSyntheticLogClassifies(t *testing.T) {
	if testing.Short() {
		t.Skip("64 MiB")
	}
	d, err := Classify(bytes.NewReader(syntheticLog(t)))
	if err != nil || d.Class != GPUOOM {
		t.Fatalf("%v %+v", err, d)
	}
}

func BenchmarkClassify(b *testing.B) {
	data := syntheticLog(b)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	for b.Loop() {
		d, err := Classify(bytes.NewReader(data))
		if err != nil || d.Class != GPUOOM {
			b.Fatal(d.Class, err)
		}
	}
}

func BenchmarkSplitter(b *testing.B) {
	data := syntheticLog(b)
	b.SetBytes(int64(len(data)))
	b.ReportAllocs()
	n := 0
	s := NewSplitter(DefaultMaxLine, func(l []byte) { n++ })
	for b.Loop() {
		for i := 0; i < len(data); i += 256 << 10 {
			s.Write(data[i:min(i+256<<10, len(data))])
		}
		s.Flush()
	}
}

func BenchmarkParserFeed(b *testing.B) {
	data := syntheticLog(b)
	lines := strings.Split(string(data), "\n")
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		p := NewParser()
		for _, l := range lines {
			p.Feed(l)
		}
	}
}
