package logparse

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestGolden pins the full Diagnosis (reason, evidence, flags) of a few
// transcripts copied into testdata/. Regenerate with -update after an
// intended change and review the diff.
func TestGolden(t *testing.T) {
	files, err := filepath.Glob("testdata/*.log")
	if err != nil {
		t.Fatal(err)
	}
	txt, _ := filepath.Glob("testdata/*.txt")
	files = append(files, txt...)
	if len(files) < 5 {
		t.Fatalf("only %d golden inputs", len(files))
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			text := string(b)
			if strings.HasSuffix(f, ".txt") { // corpus/real format: headers up to ---
				_, text = readTranscript(t, f)
			}
			d, err := Classify(strings.NewReader(text))
			if err != nil {
				t.Fatal(err)
			}
			got, err := json.MarshalIndent(d, "", "  ")
			if err != nil {
				t.Fatal(err)
			}
			got = append(got, '\n')
			golden := strings.TrimSuffix(f, filepath.Ext(f)) + ".golden.json"
			if *update {
				if err := os.WriteFile(golden, got, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run with -update)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("diagnosis changed (-update to accept):\n got: %s\nwant: %s", got, want)
			}
		})
	}
}
