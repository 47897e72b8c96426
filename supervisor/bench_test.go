package supervisor

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"testing"

	"github.com/nnguard/nnguard/logparse"
)

// benchLog writes a log of about 16 MiB made of the real clean run's lines.
func benchLog(b *testing.B) (string, int64) {
	b.Helper()
	src, err := os.ReadFile(filepath.Join("..", "..", "shared", "corpus", "nnunet-cpu", "a_clean.log"))
	if err != nil {
		b.Skip("corpus not found:", err)
	}
	var buf bytes.Buffer
	for buf.Len() < 16<<20 {
		buf.Write(src)
	}
	p := filepath.Join(b.TempDir(), "relay.log")
	if err := os.WriteFile(p, buf.Bytes(), 0o644); err != nil {
		b.Fatal(err)
	}
	if d := os.Getenv("NNGUARD_BENCH_RELAY_LOG"); d != "" { // for make bench's script(1) baseline
		os.WriteFile(d, buf.Bytes(), 0o644)
	}
	return p, int64(buf.Len())
}

// BenchmarkRelay measures the whole relay path of one attempt: a child
// writing to the pty, nnguard reading it, appending it to console.log and
// splitting and parsing every line. make bench compares it with script(1)
// relaying the same bytes.
func BenchmarkRelay(b *testing.B) {
	log, size := benchLog(b)
	console, err := os.Create(filepath.Join(b.TempDir(), "console.log"))
	if err != nil {
		b.Fatal(err)
	}
	defer console.Close()
	b.SetBytes(size)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		sink := newLineSink()
		p, err := Start(Spec{Argv: []string{"cat", log}, Env: os.Environ(), Output: io.MultiWriter(console, sink)})
		if err != nil {
			b.Fatal(err)
		}
		<-p.Done()
		sink.finish(zeroExit)
	}
}

var zeroExit = logparse.Exit{Known: true}
