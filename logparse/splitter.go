package logparse

import (
	"encoding/binary"
	"math/bits"
	"unicode/utf8"
)

// DefaultMaxLine is the line cap Classify uses.
const DefaultMaxLine = 64 << 10

// Splitter turns a raw console byte stream (what a pty relays) into clean
// lines. It implements io.Writer; every complete line is passed to emit.
//
//   - "\n", "\r\n" and a bare "\r" end a line. A "\r" right after a "\r" that
//     ended an empty line is swallowed, so "\r\n" and "\r\r\n" (the pty turns
//     "\n" into "\r\n") never produce empty duplicate lines. Progress-bar
//     redraws ("10%\r20%\r") become one line per state.
//   - ANSI escape sequences (CSI "ESC [ ... final", OSC/DCS/PM/APC strings
//     ended by BEL or "ESC \", and two-byte "ESC x") are removed, as are the
//     other C0 control bytes except TAB.
//   - Invalid UTF-8 is replaced with U+FFFD; runes split across writes are
//     reassembled.
//   - A line longer than maxLine bytes keeps its first maxLine bytes (never
//     splitting a rune) and the rest, up to the next line end, is dropped:
//     memory stays bounded whatever the input.
//
// The slice passed to emit may alias the caller's buffer or the Splitter's
// own; it is only valid until emit returns. Copy it to keep it.
//
// Plain printable-ASCII lines that arrive whole within one Write are emitted
// without copying; a Splitter allocates only to grow its line buffer.
type Splitter struct {
	maxLine int
	emit    func(line []byte)

	line  []byte // current partial line (only used when a line spans writes or needs rewriting)
	trunc bool   // current line reached maxLine: drop bytes up to the terminator
	crEnd bool   // the last thing processed was a "\r" that ended a line

	esc    escState
	oscLen int // bytes consumed in an OSC/DCS string, to bound it

	pend  [utf8.UTFMax]byte // incomplete rune carried from the previous write
	npend int
}

type escState uint8

const (
	escNone   escState = iota
	escStart           // saw ESC
	escCSI             // in ESC [ ...
	escStr             // in an OSC/DCS/PM/APC string
	escStrEsc          // in a string, saw ESC (maybe ST)
	escInter           // ESC followed by intermediate bytes (ESC ( B)
)

// maxEscString bounds an unterminated OSC/DCS string: after this many bytes
// the sequence is abandoned and the bytes are treated as text again.
const maxEscString = 4096

// NewSplitter returns a Splitter that calls emit for each line, truncating
// lines to maxLine bytes (maxLine <= 0 means DefaultMaxLine).
func NewSplitter(maxLine int, emit func(line []byte)) *Splitter {
	if maxLine <= 0 {
		maxLine = DefaultMaxLine
	}
	return &Splitter{maxLine: maxLine, emit: emit}
}

const (
	lo7 = 0x0101010101010101
	hi7 = 0x8080808080808080
)

// plainPrefix returns the length of the leading run of bytes in 0x20..0x7f.
func plainPrefix(b []byte) int {
	i := 0
	for ; i+8 <= len(b); i += 8 {
		x := binary.LittleEndian.Uint64(b[i:])
		// high bit set, or byte < 0x20 (exact for the first flagged byte).
		m := (x | ((x - 0x20*lo7) &^ x)) & hi7
		if m != 0 {
			return i + bits.TrailingZeros64(m)/8
		}
	}
	for ; i < len(b); i++ {
		if c := b[i]; c < 0x20 || c >= 0x80 {
			return i
		}
	}
	return i
}

// Write consumes p; it never fails.
func (s *Splitter) Write(p []byte) (int, error) {
	n := len(p)
	b := p
	for s.npend > 0 && len(b) > 0 {
		b = s.finishRune(b)
	}
	for len(b) > 0 {
		if s.esc != escNone {
			b = s.escape(b)
			continue
		}
		k := plainPrefix(b)
		if k > 0 {
			// Fast path: a whole plain line in the input, nothing buffered.
			if len(s.line) == 0 && !s.trunc && k < len(b) && (b[k] == '\n' || b[k] == '\r') {
				l := b[:k]
				if len(l) > s.maxLine {
					l = l[:s.maxLine]
				}
				s.crEnd = false
				s.emit(l)
				if b[k] == '\r' {
					s.crEnd = true
				}
				b = b[k+1:]
				continue
			}
			s.appendBytes(b[:k])
			b = b[k:]
			if len(b) == 0 {
				break
			}
		}
		c := b[0]
		switch {
		case c == '\n':
			if s.crEnd && len(s.line) == 0 && !s.trunc {
				s.crEnd = false // "\r\n": the "\r" already ended the line
			} else {
				s.endLine()
			}
			b = b[1:]
		case c == '\r':
			if !(s.crEnd && len(s.line) == 0 && !s.trunc) {
				s.endLine()
			}
			s.crEnd = true
			b = b[1:]
		case c == '\t':
			s.appendBytes(b[:1])
			b = b[1:]
		case c == 0x1b:
			s.esc = escStart
			b = b[1:]
		case c < 0x20:
			b = b[1:] // other C0 controls: dropped
		default: // >= 0x80
			if !utf8.FullRune(b) {
				s.npend = copy(s.pend[:], b)
				b = nil
				break
			}
			r, size := utf8.DecodeRune(b)
			if r == utf8.RuneError && size == 1 {
				appendRune(s, "\uFFFD")
			} else {
				appendRune(s, b[:size])
			}
			b = b[size:]
		}
	}
	return n, nil
}

// finishRune completes a rune started in the previous write.
func (s *Splitter) finishRune(b []byte) []byte {
	for s.npend < utf8.UTFMax && len(b) > 0 && !utf8.FullRune(s.pend[:s.npend]) {
		s.pend[s.npend] = b[0]
		s.npend++
		b = b[1:]
	}
	if !utf8.FullRune(s.pend[:s.npend]) {
		return b // still incomplete, b is empty
	}
	r, size := utf8.DecodeRune(s.pend[:s.npend])
	if r == utf8.RuneError && size == 1 {
		appendRune(s, "\uFFFD")
	} else {
		appendRune(s, s.pend[:size])
	}
	// Bytes after the decoded prefix were not part of the rune: reprocess
	// them in front of b (at most 3 bytes).
	rest := s.pend[size:s.npend]
	s.npend = 0
	if len(rest) > 0 {
		var tmp [utf8.UTFMax]byte
		m := copy(tmp[:], rest)
		s.Write(tmp[:m]) //nolint:errcheck // never fails
	}
	return b
}

// escape consumes bytes of an escape sequence and returns the rest.
func (s *Splitter) escape(b []byte) []byte {
	for len(b) > 0 {
		c := b[0]
		switch s.esc {
		case escStart:
			switch {
			case c == '[':
				s.esc = escCSI
			case c == ']' || c == 'P' || c == 'X' || c == '^' || c == '_':
				s.esc = escStr
				s.oscLen = 0
			case c >= 0x20 && c <= 0x2f:
				s.esc = escInter
			case c == '\n' || c == '\r' || c == 0x1b:
				s.esc = escNone
				return b // let the caller handle it
			default:
				s.esc = escNone // ESC x
			}
		case escCSI:
			switch {
			case c >= 0x40 && c <= 0x7e:
				s.esc = escNone
			case c >= 0x20 && c <= 0x3f:
				// parameter or intermediate byte
			default:
				s.esc = escNone
				return b // malformed: the byte is text or a control
			}
		case escInter:
			switch {
			case c >= 0x20 && c <= 0x2f:
			case c >= 0x30 && c <= 0x7e:
				s.esc = escNone
			default:
				s.esc = escNone
				return b
			}
		case escStr, escStrEsc:
			s.oscLen++
			switch {
			case c == 0x07:
				s.esc = escNone
			case s.esc == escStrEsc && c == '\\':
				s.esc = escNone
			case c == 0x1b:
				s.esc = escStrEsc
			case c == '\n' || s.oscLen > maxEscString:
				s.esc = escNone
				return b
			default:
				s.esc = escStr
			}
		}
		b = b[1:]
		if s.esc == escNone {
			return b
		}
	}
	return b
}

func (s *Splitter) appendBytes(b []byte) {
	s.crEnd = false
	if s.trunc {
		return
	}
	if room := s.maxLine - len(s.line); len(b) > room {
		b = b[:room]
		s.trunc = true
	}
	s.line = append(s.line, b...)
}

// appendRune appends one whole rune, or truncates if it does not fit.
func appendRune[T string | []byte](s *Splitter, r T) {
	s.crEnd = false
	if s.trunc {
		return
	}
	if len(s.line)+len(r) > s.maxLine {
		s.trunc = true
		return
	}
	s.line = append(s.line, r...)
}

func (s *Splitter) endLine() {
	s.emit(s.line)
	s.line = s.line[:0]
	s.trunc = false
	s.crEnd = false
}

// Flush emits the final unterminated line, if any. An incomplete rune at the
// end becomes U+FFFD; an unfinished escape sequence is dropped.
func (s *Splitter) Flush() {
	if s.npend > 0 {
		s.npend = 0
		appendRune(s, "\uFFFD")
	}
	s.esc = escNone
	if len(s.line) > 0 || s.trunc {
		s.endLine()
	}
	s.crEnd = false
}
