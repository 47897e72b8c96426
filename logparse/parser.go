package logparse

import (
	"strconv"
	"strings"
)

// NaNEpochs is how many consecutive epochs with a NaN train or val loss make
// the parser emit a Fatal nan_loss event.
const NaNEpochs = 3

const (
	maxEvidence     = 8    // lines in a Diagnosis
	maxSigEvidence  = 3    // lines kept per signal
	maxEvidenceText = 1024 // bytes kept per evidence line
)

// sigRec keeps what is known about one signal: where it first appeared and
// its first few lines. Its size is fixed, so memory stays bounded.
type sigRec struct {
	first int // line of the first occurrence, 0 if never
	n     int
	ev    [maxSigEvidence]Evidence
	nev   int
	det   bool
	exc   Evidence // first evidence that is an exception line
}

func (r *sigRec) add(e Evidence) {
	if r.first == 0 {
		r.first = e.Line
	}
	r.n++
	if r.nev < len(r.ev) {
		if r.nev > 0 && r.ev[r.nev-1].Line == e.Line {
			return
		}
		r.ev[r.nev] = e
		r.nev++
	}
}

func (r *sigRec) evidence() []Evidence { return r.ev[:r.nev] }

// Parser reads lines of nnUNetv2_train (or nnU-Net v1) console output and
// reports progress events and failure evidence. It keeps a fixed amount of
// state whatever the length of the log. It is not safe for concurrent use.
type Parser struct {
	line   int
	epoch  int // current 0-based epoch, -1 if unknown
	events []Event
	found  patSet

	// progress
	trainingDone bool
	inValidation bool
	cfgLeft      int // v2: lines after the configuration header to look for 'batch_size'
	v1cfg        bool
	v1stage      int
	v1bs         [8]int
	batchSize    int

	// NaN tracking: epochKey advances at every epoch end.
	epochKey      int
	nanCountedKey int
	nanStreak     int
	nanRec        sigRec
	nanLast       Evidence

	// traceback state
	tbOpen        bool // inside a traceback: header or frames seen, no exception line yet
	tbCtx         ctx  // contexts seen in the current traceback
	tbSeen        bool // any traceback or frame seen at all
	workerPending bool // "Exception in background worker" seen, its exception not yet
	workerMsgNext bool // the next line is the worker's one-line message
	plotLine      int  // line of "Unable to plot network architecture"
	valWin        bool // after the predictor's OOM fallback message, same case
	valWinDuring  bool // a chained traceback started inside the window
	valWinOOM     Evidence

	sigs    [numSig]sigRec
	ctxEv   [numCtx]Evidence // last frame line per context
	ctxSeen ctx
	generic sigRec // first unrecognised exceptions (root of an unknown crash)
	excSeen int    // exception lines seen

	dataFile string // first data file named by a worker/exception line
	ckptFile string // first checkpoint/pickle named by an exception line

	oomReq      string // "tried to allocate" size of the first OOM
	oomRU       bool
	oomPhase    string // "training", "validation", "startup", "" (unknown)
	oomPhaseSet bool

	fatalSent bool
	lineTS    bool // the current line has an nnU-Net timestamp
	sawTS     bool // any timestamped line seen: the trainer's own output is present

	workerMsg Evidence // the worker's one-line message or exception line
	prevFrame bool     // the previous line was a traceback frame
}

// NewParser returns a Parser at line 0.
func NewParser() *Parser {
	return &Parser{epoch: -1, v1stage: -1}
}

// Line returns the number of lines fed so far.
func (p *Parser) Line() int { return p.line }

// Epoch returns the current 0-based epoch, -1 if none was seen.
func (p *Parser) Epoch() int { return p.epoch }

// BatchSize returns the batch size parsed from the printed configuration, 0
// if none.
func (p *Parser) BatchSize() int { return p.batchSize }

// Feed parses one line (without its terminator) and returns the events it
// produced. The returned slice is valid until the next call. Feed does not
// retain line.
func (p *Parser) Feed(line string) []Event {
	p.events = p.events[:0]
	p.line++
	p.progress(line)
	p.failure(line)
	return p.events
}

func (p *Parser) emit(e Event) {
	e.Line = p.line
	p.events = append(p.events, e)
}

func (p *Parser) ev(line string) Evidence {
	t := line
	if len(t) > maxEvidenceText {
		t = t[:maxEvidenceText]
		for len(t) > 0 && t[len(t)-1] >= 0x80 && t[len(t)-1] < 0xC0 {
			t = t[:len(t)-1] // do not cut a rune in half
		}
		if len(t) > 0 && t[len(t)-1] >= 0xC0 {
			t = t[:len(t)-1]
		}
		t += "…"
	}
	return Evidence{Line: p.line, Text: strings.Clone(t)}
}

// ---------------------------------------------------------------- progress

// splitTS returns the message after an nnU-Net timestamp prefix
// ("2026-11-28 22:24:14.121445: "; microseconds may be absent, the first
// characters may be missing in pasted logs).
func splitTS(s string) (string, bool) {
	n := len(s)
	if n > 40 {
		n = 40
	}
	dash := false
	for i := 0; i < n; i++ {
		c := s[i]
		switch {
		case c >= '0' && c <= '9', c == '.', c == ' ':
		case c == '-':
			dash = true
		case c == ':':
			if i+1 < len(s) && s[i+1] == ' ' {
				if i >= 14 && dash {
					return s[i+2:], true
				}
				return "", false
			}
			if i+1 == len(s) && i >= 14 && dash {
				return "", true
			}
		default:
			return "", false
		}
	}
	return "", false
}

func leadingInt(s string) (int, bool) {
	i := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		i++
	}
	if i == 0 || i > 9 {
		return 0, false
	}
	v, _ := strconv.Atoi(s[:i])
	return v, true
}

func isNaNText(s string) bool {
	s = strings.TrimSpace(s)
	return s == "nan" || s == "-nan" || s == "NaN" || s == "+nan"
}

func (p *Parser) progress(line string) {
	msg, ts := splitTS(line)
	p.lineTS = ts
	if ts {
		p.sawTS = true
	}
	if !ts {
		p.untimestamped(line)
		return
	}
	msg = strings.TrimRight(msg, " ")
	if msg == "" {
		return
	}
	switch msg[0] {
	case 'E':
		if rest, ok := strings.CutPrefix(msg, "Epoch "); ok {
			if n, ok := leadingInt(rest); ok && len(rest) == len(strconv.Itoa(n)) {
				p.epochStart(n)
				return
			}
			if t, ok := strings.CutPrefix(rest, "time: "); ok {
				p.epochEnd(strings.TrimSuffix(t, " s"))
			}
		}
	case 'T':
		if t, ok := strings.CutPrefix(msg, "This epoch took "); ok { // v1
			p.epochEnd(strings.TrimSuffix(t, " s"))
		} else if msg == "Training done." {
			p.trainingDone = true
			p.inValidation = true
			p.emit(Event{Kind: TrainingDone, Epoch: p.epoch})
		}
	case 'Y':
		if strings.HasPrefix(msg, "Yayy! New best") {
			p.emit(Event{Kind: NewBest, Epoch: p.epoch})
		}
	case 'N':
		if strings.HasPrefix(msg, "New best") { // v1
			p.emit(Event{Kind: NewBest, Epoch: p.epoch})
		}
	case 't':
		if v, ok := strings.CutPrefix(msg, "train_loss "); ok {
			p.loss(v, line)
		} else if v, ok := strings.CutPrefix(msg, "train loss :"); ok { // v1
			p.loss(v, line)
		}
	case 'v':
		if v, ok := strings.CutPrefix(msg, "val_loss "); ok {
			p.loss(v, line)
		} else if v, ok := strings.CutPrefix(msg, "validation loss:"); ok { // v1
			p.loss(v, line)
		}
	case 'p':
		if c, ok := strings.CutPrefix(msg, "predicting "); ok {
			p.inValidation = true
			p.valWin, p.valWinDuring = false, false
			p.emit(Event{Kind: ValidationCase, Epoch: p.epoch, Text: strings.Clone(strings.TrimSpace(c))})
		}
	case 'V':
		if strings.HasPrefix(msg, "Validation complete") {
			p.valWin = false
			p.emit(Event{Kind: ValidationDone, Epoch: p.epoch})
		}
	case 'e':
		if rest, ok := strings.CutPrefix(msg, "epoch: "); ok { // v1 on one line
			if n, ok := leadingInt(strings.TrimLeft(rest, " ")); ok {
				p.epochStart(n)
			}
		}
	}
}

func (p *Parser) untimestamped(line string) {
	if line == "" {
		return
	}
	if p.cfgLeft > 0 {
		p.cfgLeft--
		if bs, ok := dictBatchSize(line); ok {
			p.cfgLeft = 0
			p.setBatchSize(bs)
			return
		}
	}
	switch line[0] {
	case 'e':
		if rest, ok := strings.CutPrefix(line, "epoch: "); ok { // v1: "epoch:  12"
			if n, ok := leadingInt(strings.TrimLeft(rest, " ")); ok {
				p.epochStart(n)
			}
		}
	case 'E':
		if rest, ok := strings.CutPrefix(line, "Epoch "); ok { // forks without timestamps
			if n, ok := leadingInt(rest); ok && strings.TrimSpace(rest) == strconv.Itoa(n) {
				p.epochStart(n)
			}
		}
	case 'T':
		if strings.HasPrefix(line, "This is the configuration used by this training") {
			p.cfgLeft = 4
		}
	case 'F':
		if strings.HasPrefix(line, "For that I will be using the following configuration") { // v1
			p.v1cfg = true
			p.v1stage = -1
			p.v1bs = [8]int{}
		}
	case 's':
		if rest, ok := strings.CutPrefix(line, "stage: "); ok && p.v1cfg {
			if n, ok := leadingInt(strings.TrimLeft(rest, " ")); ok {
				p.v1stage = n
			}
		}
	case '{':
		if p.v1cfg && p.v1stage >= 0 && p.v1stage < len(p.v1bs) {
			if bs, ok := dictBatchSize(line); ok {
				p.v1bs[p.v1stage] = bs
			}
		}
	case 'I':
		if rest, ok := strings.CutPrefix(line, "I am using stage "); ok && p.v1cfg {
			if n, ok := leadingInt(rest); ok && n >= 0 && n < len(p.v1bs) && p.v1bs[n] > 0 {
				p.setBatchSize(p.v1bs[n])
			}
			p.v1cfg = false
		}
	case 'P':
		if strings.HasPrefix(line, "Prediction on device was unsuccessful") {
			p.inValidation = true
		}
	}
}

// dictBatchSize finds 'batch_size': N in a printed Python dict.
func dictBatchSize(line string) (int, bool) {
	i := strings.Index(line, "'batch_size': ")
	if i < 0 {
		return 0, false
	}
	return leadingInt(line[i+len("'batch_size': "):])
}

func (p *Parser) setBatchSize(bs int) {
	p.batchSize = bs
	p.emit(Event{Kind: BatchSize, Epoch: p.epoch, BatchSize: bs})
}

func (p *Parser) epochStart(n int) {
	p.epoch = n
	// A new epoch means training (again): a later run in the same log (a job
	// that trains several folds, an appended cluster log) is not in the
	// final validation of an earlier one.
	p.inValidation = false
	p.valWin = false
	p.trainingDone = false
	p.emit(Event{Kind: EpochStart, Epoch: n})
}

func (p *Parser) epochEnd(secs string) {
	f, err := strconv.ParseFloat(strings.TrimSpace(secs), 64)
	if err != nil {
		f = 0
	}
	if p.nanCountedKey != p.epochKey+1 { // no NaN loss in this epoch
		p.nanStreak = 0
	}
	p.epochKey++
	p.emit(Event{Kind: EpochEnd, Epoch: p.epoch, Seconds: f})
}

// loss handles a train/val loss value. nanCountedKey stores epochKey+1 of
// the last epoch that had a NaN loss, so an epoch counts once.
func (p *Parser) loss(v, line string) {
	if !isNaNText(v) {
		return
	}
	if p.nanCountedKey == p.epochKey+1 {
		return
	}
	p.nanCountedKey = p.epochKey + 1
	if p.nanStreak == 0 {
		p.nanRec = sigRec{}
	}
	p.nanStreak++
	p.nanLast = p.ev(line)
	p.nanRec.add(p.nanLast)
	if p.nanStreak >= NaNEpochs {
		p.fatal()
	}
}

// ---------------------------------------------------------------- failures

// stripPrefix removes what surrounds log text in pasted or relayed logs:
// indentation, markdown emphasis, quoting, and one bracketed prefix such as
// a CI timestamp "[2024-04-20T22:34:42.874Z]" or "[rank0]:".
func stripPrefix(s string) string {
	for range 3 {
		i := 0
		for i < len(s) && (s[i] == ' ' || s[i] == '\t' || s[i] == '*' || s[i] == '>' || s[i] == '`') {
			i++
		}
		s = s[i:]
		if len(s) > 0 && s[0] == '[' {
			if j := strings.IndexByte(s, ']'); j > 0 && j < 48 {
				s = strings.TrimPrefix(s[j+1:], ":")
				continue
			}
		}
		break
	}
	return s
}

func isIdentStart(c byte) bool {
	return c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')
}

func isIdent(c byte) bool { return isIdentStart(c) || (c >= '0' && c <= '9') || c == '.' }

// excName returns the exception class of a Python exception line
// ("torch.OutOfMemoryError: CUDA out of memory...", "KeyboardInterrupt").
func excName(s string) (string, bool) {
	if s == "" || !isIdentStart(s[0]) {
		return "", false
	}
	i := 1
	for i < len(s) && isIdent(s[i]) {
		i++
	}
	name := s[:i]
	rest := s[i:]
	if rest != "" && !(rest == ":" || strings.HasPrefix(rest, ": ")) {
		return "", false
	}
	last := name
	if j := strings.LastIndexByte(name, '.'); j >= 0 {
		last = name[j+1:]
	}
	switch {
	case strings.HasSuffix(last, "Error"), strings.HasSuffix(last, "Exception"),
		strings.HasSuffix(last, "Interrupt"), strings.HasSuffix(last, "Failed"),
		strings.Contains(name, ".exc."):
		return name, true
	}
	return "", false
}

// secondaryExc are exceptions that follow another process's death.
func secondaryExc(name string) bool {
	switch name {
	case "BrokenPipeError", "ConnectionResetError", "ConnectionRefusedError",
		"ConnectionAbortedError", "EOFError":
		return true
	}
	return false
}

func (p *Parser) failure(line string) {
	p.found = patSet{}
	hit := defaultMatcher.scan(line, &p.found)

	// Structure (frames, exception lines, "Killed") never starts with a
	// digit: skip it for timestamped lines, the bulk of a long log.
	var (
		frame, isExc, killedLine bool
		exc                      string
	)
	if len(line) > 0 && (line[0] < '0' || line[0] > '9') {
		s := stripPrefix(line)
		frame = strings.HasPrefix(s, `File "`) && !faultFrame(s)
		exc, isExc = excName(s)
		killedLine = s == "Killed" || s == "Killed."
	}

	// The line after a frame is source code ("raise RuntimeError(...)"):
	// its words are code, not a message, so it only gives context.
	source := p.prevFrame && len(line) > 0 && (line[0] == ' ' || line[0] == '\t')
	p.prevFrame = frame
	if !hit && !frame && !isExc && !killedLine && !p.workerMsgNext {
		return // the common case: nothing to look at
	}
	if source {
		isExc = false
	}

	// Pick the line's signal (highest priority) and collect contexts.
	best, bestPrio, det := sigNone, -1, false
	var lc ctx
	if hit {
		for i := range patterns {
			if !p.found.has(i) {
				continue
			}
			pt := &patterns[i]
			lc |= pt.ctx
			if pt.sig == sigNone || int(pt.prio) <= bestPrio || source {
				continue
			}
			if sg, ok := p.verify(pt.sig, line, isExc, exc); ok {
				best, bestPrio, det = sg, int(pt.prio), pt.det
			}
		}
	}
	if killedLine {
		best = sigHostKill
	}

	// Traceback structure.
	if lc&ctxTraceback != 0 {
		if !p.tbOpen {
			p.tbCtx = 0
			if p.workerPending {
				p.tbCtx |= ctxProducer
			}
		}
		p.tbOpen, p.tbSeen = true, true
		if p.valWin && p.tbCtx&ctxDuring != 0 {
			p.valWinDuring = true
		}
	}
	if lc&ctxDuring != 0 {
		p.tbCtx |= ctxDuring
		if p.valWin {
			p.valWinDuring = true
		}
	}
	if frame {
		p.tbOpen, p.tbSeen = true, true
	}
	if lcf := lc &^ (ctxTraceback | ctxDuring); lcf != 0 {
		p.tbCtx |= lcf
		p.ctxSeen |= lcf
		e := p.ev(line)
		for i := range numCtx {
			if lcf&(1<<i) != 0 {
				p.ctxEv[i] = e
			}
		}
		if lcf&ctxProducer != 0 && !p.workerPending {
			p.sigs[sigWorker].add(e) // a worker's traceback, header maybe cut off
		}
		if lcf&ctxValidation != 0 {
			p.inValidation = true
		}
	}

	// The worker's one-line message after "Exception in background worker N:".
	if p.workerMsgNext && best != sigWorker {
		p.workerMsgNext = false
		e := p.ev(line)
		p.sigs[sigWorker].add(e)
		if p.workerMsg.Line == 0 && strings.TrimSpace(line) != "" {
			p.workerMsg = e
		}
		p.noteFile(line)
	}

	fatal := false
	switch best {
	case sigNone:
	case sigWorker:
		p.sigs[sigWorker].add(p.ev(line))
		p.workerPending, p.workerMsgNext = true, true
	case sigOOM:
		switch {
		case p.plotLine > 0 && (p.line == p.plotLine || p.line == p.plotLine+1 && p.lineTS):
			// "Unable to plot network architecture:" + the exception: caught.
		case p.valWin && !p.valWinDuring:
			// The predictor caught it and retries with results on the CPU.
			if p.valWinOOM.Line == 0 {
				p.valWinOOM = p.ev(line)
				p.oomDetails(line)
			}
		default:
			p.sigs[sigOOM].add(p.ev(line))
			p.oomDetails(line)
			fatal = true
		}
	case sigPlotCaught:
		p.plotLine = p.line
	case sigValFallback:
		p.inValidation = true
		p.valWin, p.valWinDuring = true, false
		p.sigs[sigValFallback].add(p.ev(line))
	case sigInterrupt:
		if isExc {
			p.sigs[sigInterrupt].add(p.ev(line))
		}
	default:
		r := &p.sigs[best]
		e := p.ev(line)
		r.add(e)
		r.det = r.det || det
		if isExc && r.exc.Line == 0 {
			r.exc = e
		}
		switch best {
		case sigCUDA, sigCUDADet, sigHostKill, sigDead, sigExport, sigCrash, sigShm:
			fatal = true
		case sigCkpt, sigConfig, sigDisk, sigHostMem:
			p.noteFile(line)
		}
	}

	if isExc {
		p.excSeen++
		wasOpen := p.tbOpen
		p.tbOpen = false
		recognised := best != sigNone && best < numTier1 || best == sigDead || best == sigCrash
		switch {
		case exc == "KeyboardInterrupt" || strings.HasSuffix(exc, ".KeyboardInterrupt"):
			// stopped on purpose: not a failure, no Fatal
		case p.valWin && !p.valWinDuring && best == sigOOM:
			// caught by the predictor (see above)
		default:
			if p.tbCtx&ctxProducer != 0 || p.workerPending {
				e := p.ev(line)
				p.sigs[sigWorker].add(e)
				if p.workerMsg.Line == 0 {
					p.workerMsg = e
				}
				p.noteFile(line)
				p.workerPending = false
			} else if !recognised && !secondaryExc(exc) && best != sigEOF {
				p.generic.add(p.ev(line))
				p.noteFile(line)
			}
			if p.valWin && p.valWinOOM.Line != 0 && p.sigs[sigOOM].first == 0 {
				// The CPU fallback crashed too: the caught OOM was the start.
				p.sigs[sigOOM].add(p.valWinOOM)
			}
			if wasOpen || recognised {
				fatal = true
			}
		}
	}
	if fatal {
		p.fatal()
	}
}

// verify gives the second look some patterns need, and returns the signal
// the line stands for.
func (p *Parser) verify(sg sig, line string, isExc bool, exc string) (sig, bool) {
	switch sg {
	case sigEOF:
		if p.tbCtx&ctxLoad != 0 && p.tbCtx&ctxProducer == 0 && !p.workerPending {
			return sigCkpt, true
		}
		return sigEOF, true
	case sigNoSuchFile:
		if isExc || strings.Contains(line, "Errno 2]") {
			return sigConfig, true
		}
		return sigNone, false
	case sigCalledProc:
		for _, c := range []string{"gcc", "g++", "clang", "nvcc", "triton", "cc1", "'cc'", "/cc", "-shared", "ld"} {
			if strings.Contains(line, c) {
				return sigCompile, true
			}
		}
		return sigNone, false
	case sigKilledWord:
		// bash: "./train.sh: line 3: 12345 Killed   nnUNetv2_train ..."
		i := strings.Index(line, " Killed ")
		j := i
		for j > 0 && line[j-1] >= '0' && line[j-1] <= '9' {
			j--
		}
		if j < i {
			return sigHostKill, true
		}
		return sigNone, false
	case sigRequested:
		if strings.Contains(line, " written") {
			return sigDisk, true
		}
		return sigNone, false
	case sigAssertTick:
		if strings.Contains(line, ".cu") && strings.Contains(line, "failed") {
			return sigCUDADet, true
		}
		if strings.Contains(line, "failed") {
			return sigCrash, true
		}
		return sigNone, false
	case sigNotDefined:
		if strings.Contains(line, "nnUNet_") || strings.Contains(line, "RESULTS_FOLDER") {
			return sigConfig, true
		}
		return sigNone, false
	case sigDevShm:
		if containsFold(line, "No space left") || containsFold(line, "bus error") {
			return sigShm, true
		}
		return sigNone, false
	case sigWorkersMany:
		return sigDead, true
	case sigCCError:
		// gcc/clang building Triton's or inductor's C sources:
		// "/tmp/tmpab12/main.c:354:3: error: ...",
		// "/usr/include/python3.10/pyconfig.h:3:12: fatal error: ...".
		if strings.Contains(line, "error:") {
			for _, ext := range []string{".c:", ".h:", ".cpp:", ".cc:", ".hpp:"} {
				if strings.Contains(line, ext) {
					return sigCompile, true
				}
			}
		}
		return sigNone, false
	case sigExcInThread:
		return sigNone, false
	case sigCUDA:
		if strings.Contains(line, "device-side assert") {
			return sigCUDADet, true
		}
	case sigConfig:
		if exc == "" && !isExc {
			// "ImportError"/"FileNotFoundError"/"ModuleNotFoundError" only
			// count on an exception line; the others are full messages.
			l := strings.ToLower(line)
			if strings.Contains(l, "importerror") && !strings.Contains(l, "importerror:") ||
				strings.Contains(l, "modulenotfounderror") && !strings.Contains(l, "modulenotfounderror:") ||
				strings.Contains(l, "filenotfounderror") && !strings.Contains(l, "filenotfounderror:") {
				return sigNone, false
			}
		}
	}
	return sg, true
}

var dataExts = []string{".npy", ".npz", ".pkl", ".b2nd", ".pth", ".model", ".json"}

// noteFile remembers the first data or checkpoint file an error line names
// (never a Python source file).
func (p *Parser) noteFile(line string) {
	if p.dataFile != "" && p.ckptFile != "" {
		return
	}
	if strings.HasPrefix(stripPrefix(line), `File "`) {
		return
	}
	for _, ext := range dataExts {
		i := strings.Index(line, ext)
		for i >= 0 {
			end := i + len(ext)
			if end == len(line) || !isIdent(line[end]) || line[end] == '.' {
				start := i
				for start > 0 && !strings.ContainsRune("'\"` <>(),=", rune(line[start-1])) {
					start--
				}
				path := line[start:end]
				if len(path) > len(ext) && (strings.ContainsAny(path, `/\`) || start > 0) {
					path = strings.Clone(path)
					switch ext {
					case ".pth", ".model", ".json":
						if p.ckptFile == "" {
							p.ckptFile = path
						}
					case ".pkl":
						if p.ckptFile == "" {
							p.ckptFile = path
						}
						if p.dataFile == "" {
							p.dataFile = path
						}
					default:
						if p.dataFile == "" {
							p.dataFile = path
						}
					}
					return
				}
			}
			j := strings.Index(line[end:], ext)
			if j < 0 {
				break
			}
			i = end + j
		}
	}
}

// faultFrame reports a faulthandler stack-dump frame ("File "x.py", line 675
// in f", no comma before "in"): a dump of a live process, not a traceback.
func faultFrame(s string) bool {
	i := strings.Index(s, `", line `)
	if i < 0 {
		return false
	}
	r := s[i+len(`", line `):]
	j := 0
	for j < len(r) && r[j] >= '0' && r[j] <= '9' {
		j++
	}
	return strings.HasPrefix(r[j:], " in ")
}

func (p *Parser) fatal() {
	if p.fatalSent {
		return
	}
	c := p.decide(Exit{})
	if c.class == None {
		return // e.g. the results_loop noise after a KeyboardInterrupt
	}
	p.fatalSent = true
	p.emit(Event{Kind: Fatal, Epoch: p.epoch, Class: c.class})
}
