package logparse

import (
	"bytes"
	"slices"
	"strings"
	"testing"
	"unicode/utf8"
)

func split(maxLine int, chunks ...string) []string {
	var out []string
	s := NewSplitter(maxLine, func(l []byte) { out = append(out, string(l)) })
	for _, c := range chunks {
		s.Write([]byte(c))
	}
	s.Flush()
	return out
}

func TestSplitter(t *testing.T) {
	tests := []struct {
		name string
		in   string
		max  int
		want []string
	}{
		{"lf", "a\nb\n", 0, []string{"a", "b"}},
		{"crlf", "a\r\nb\r\n", 0, []string{"a", "b"}},
		{"crlf empty lines", "a\r\n\r\nb\r\n", 0, []string{"a", "", "b"}},
		{"cr cr lf", "a\r\r\nb", 0, []string{"a", "b"}},
		{"bare cr progress", "10%\r20%\r30%\n", 0, []string{"10%", "20%", "30%"}},
		{"unterminated", "a\nlast", 0, []string{"a", "last"}},
		{"empty lines", "\n\nx\n", 0, []string{"", "", "x"}},
		{"csi color", "\x1b[31mred\x1b[0m text\n", 0, []string{"red text"}},
		{"csi params", "\x1b[1;32;40mok\x1b[K\n", 0, []string{"ok"}},
		{"osc bel", "\x1b]0;title\x07body\n", 0, []string{"body"}},
		{"osc st", "\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\\n", 0, []string{"link"}},
		{"esc x", "a\x1b=b\x1b(Bc\n", 0, []string{"abc"}},
		{"controls", "a\x00b\x08c\td\n", 0, []string{"abc\td"}},
		{"invalid utf8", "a\xffb\xc3\n", 0, []string{"a\uFFFDb\uFFFD"}},
		{"valid utf8", "grüße ✓\n", 0, []string{"grüße ✓"}},
		{"long", "abcdefghij\nxy\n", 4, []string{"abcd", "xy"}},
		{"long unicode", "ab✓✓\n", 4, []string{"ab"}},
		{"long cr", "abcdefghij\r\nxy", 4, []string{"abcd", "xy"}},
		{"esc at eol", "abc\x1b\ndef\n", 0, []string{"abc", "def"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := split(tc.max, tc.in)
			if !slices.Equal(got, tc.want) {
				t.Errorf("got %q, want %q", got, tc.want)
			}
			// Every split point gives the same lines.
			for i := 0; i <= len(tc.in); i++ {
				if g := split(tc.max, tc.in[:i], tc.in[i:]); !slices.Equal(g, tc.want) {
					t.Errorf("split at %d: got %q, want %q", i, g, tc.want)
				}
			}
			// Byte by byte.
			var chunks []string
			for i := 0; i < len(tc.in); i++ {
				chunks = append(chunks, tc.in[i:i+1])
			}
			if g := split(tc.max, chunks...); !slices.Equal(g, tc.want) {
				t.Errorf("bytewise: got %q, want %q", g, tc.want)
			}
		})
	}
}

func TestSplitterBoundedMemory(t *testing.T) {
	var n, longest int
	s := NewSplitter(1000, func(l []byte) {
		n++
		longest = max(longest, len(l))
	})
	chunk := bytes.Repeat([]byte("x"), 1<<16)
	for range 200 { // 12.5 MiB without a newline
		s.Write(chunk)
	}
	s.Write([]byte("\nok\n"))
	s.Flush()
	if n != 2 || longest != 1000 {
		t.Errorf("lines %d longest %d", n, longest)
	}
	if cap(s.line) > 4096 {
		t.Errorf("line buffer grew to %d", cap(s.line))
	}
}

func TestSplitterCorpusSame(t *testing.T) {
	// The CPU logs split in 7-byte writes give the same lines as one write.
	b := mustRead(t, cpuCorpus+"/c_fake_oom.log")
	crlf := bytes.ReplaceAll(b, []byte("\n"), []byte("\r\n")) // as the pty relays it
	var whole, pieces []string
	s := NewSplitter(0, func(l []byte) { whole = append(whole, string(l)) })
	s.Write(b)
	s.Flush()
	s = NewSplitter(0, func(l []byte) { pieces = append(pieces, string(l)) })
	for i := 0; i < len(crlf); i += 7 {
		s.Write(crlf[i:min(i+7, len(crlf))])
	}
	s.Flush()
	if !slices.Equal(whole, pieces) {
		t.Errorf("lines differ: %d vs %d", len(whole), len(pieces))
	}
	if want := strings.Count(string(b), "\n"); len(whole) != want {
		t.Errorf("%d lines, want %d", len(whole), want)
	}
}

func TestSplitterNoAllocPlain(t *testing.T) {
	data := []byte(strings.Repeat("2026-11-28 22:24:16.091730: train_loss 0.4932\n", 100))
	s := NewSplitter(0, func([]byte) {})
	allocs := testing.AllocsPerRun(50, func() { s.Write(data) })
	if allocs != 0 {
		t.Errorf("%v allocations per write", allocs)
	}
}

func FuzzSplitter(f *testing.F) {
	f.Add([]byte("a\r\nb\rc\x1b[31md\xff\n"), 5)
	f.Add([]byte("\x1b]0;t\x07x\xe2\x9c"), 3)
	f.Fuzz(func(t *testing.T, data []byte, cut int) {
		const maxLine = 16
		var ref []string
		s := NewSplitter(maxLine, func(l []byte) {
			if len(l) > maxLine {
				t.Fatalf("line of %d bytes", len(l))
			}
			if !utf8.Valid(l) {
				t.Fatalf("invalid utf8 %q", l)
			}
			if bytes.ContainsAny(l, "\r\n\x1b") {
				t.Fatalf("terminator or ESC in %q", l)
			}
			ref = append(ref, string(l))
		})
		s.Write(data)
		s.Flush()
		if cut < 0 {
			cut = -cut
		}
		if len(data) > 0 {
			cut %= len(data) + 1
		} else {
			cut = 0
		}
		var got []string
		s2 := NewSplitter(maxLine, func(l []byte) { got = append(got, string(l)) })
		s2.Write(data[:cut])
		s2.Write(data[cut:])
		s2.Flush()
		if !slices.Equal(ref, got) {
			t.Fatalf("split at %d: %q vs %q", cut, got, ref)
		}
	})
}
