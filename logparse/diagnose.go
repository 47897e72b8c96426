package logparse

import (
	"fmt"
	"io"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"unsafe"
)

// Diagnose returns the root cause of the failure seen so far, given how the
// process ended (the zero Exit means "unknown", e.g. a saved log).
//
// Precedence (root cause first):
//
//  1. Explicit causes, earliest line wins: GPU OOM, /dev/shm full, CUDA
//     errors, torch.compile errors, disk full, corrupt checkpoint/pickle,
//     configuration errors, a data-augmentation worker's exception, host RAM
//     (MemoryError, OOM killer, "Killed"), the export pool dying in the final
//     validation, KeyboardInterrupt (→ none: stopped on purpose). The first
//     one is the cause and what follows is fallout (an OOM before "no longer
//     alive" wins; a device-side assert before the workers' tracebacks wins).
//     Two refinements: a worker exception that is itself a host-RAM, shm or
//     disk error takes that class (the remedy is the resource, not the
//     data); host-RAM evidence during the final validation next to a dead
//     export pool is validation_export.
//  2. An exit status of 0 means no failure (except NaN losses, which do not
//     crash the trainer).
//  3. Weaker evidence, only when nothing explicit was printed: NaN losses in
//     the latest epoch(s); a crash whose traceback shows torch.compile's
//     compile phase (compile_error), that follows nnU-Net's "Error when
//     checking ... fixing" of unpacked files (corrupt_checkpoint) or an
//     "nnUNet_* is not defined" warning (config_error); an unrecognised
//     exception (unknown); a log that ends inside a traceback (training-step
//     forward/backward → gpu_oom, final validation → validation_export, else
//     unknown; all marked "inferred"); dead workers with no exception of
//     their own (host_oom: killed, most likely for RAM); a native crash
//     (unknown); then the exit status alone: SIGKILL/137 → host_oom, SIGINT
//     → none, any other signal or nonzero code → unknown.
//  4. Otherwise none.
func (p *Parser) Diagnose(exit Exit) Diagnosis {
	v := p.decide(exit)
	d := Diagnosis{
		Class:               v.class,
		Reason:              v.reason,
		Evidence:            v.ev,
		ReservedUnallocated: v.ru,
		Deterministic:       v.det,
		File:                v.file,
		InValidation:        v.inVal,
	}
	if d.Evidence == nil {
		d.Evidence = []Evidence{}
	}
	return d
}

type verdict struct {
	class  Class
	reason string
	ev     []Evidence
	ru     bool
	det    bool
	file   string
	inVal  bool
}

func (p *Parser) decide(exit Exit) verdict {
	best, bestLine := sigNone, 0
	for s := sigOOM; s < numTier1; s++ {
		if f := p.sigs[s].first; f > 0 && (bestLine == 0 || f < bestLine) {
			best, bestLine = s, f
		}
	}
	if best == sigWorker {
		for _, s := range []sig{sigHostMem, sigShm, sigDisk} {
			if p.sigs[s].first > 0 {
				best = s
				break
			}
		}
	}
	if (best == sigHostKill || best == sigHostMem) && p.sigs[sigExport].first > 0 && p.inValidation {
		best = sigExport
	}
	if exit.Known && exit.Code == 0 && exit.Signal == "" && p.nanStreak == 0 {
		return verdict{class: None, reason: "the trainer exited normally (status 0)"}
	}
	if best != sigNone {
		return p.explicit(best)
	}

	crashed := p.tbSeen || p.excSeen > 0 || p.sigs[sigDead].first > 0 || p.sigs[sigCrash].first > 0 ||
		p.sigs[sigExport].first > 0 || (exit.Known && (exit.Code != 0 || exit.Signal != ""))
	inVal := p.inValidation
	switch {
	case p.nanStreak > 0:
		ev := append(slices.Clone(p.nanRec.evidence()), p.nanLast)
		return verdict{class: NaNLoss, ev: sortEvidence(ev), inVal: inVal,
			reason: fmt.Sprintf("the loss is NaN in the last %d epoch(s); training diverged or the data contain invalid values (check intensities and labels)", p.nanStreak)}
	case crashed && p.ctxSeen&ctxCompile != 0:
		ev := []Evidence{p.ctxEv[bit(ctxCompile)]}
		ev = append(ev, p.generic.evidence()...)
		return verdict{class: CompileError, ev: sortEvidence(ev), inVal: inVal,
			reason: "the trainer crashed inside torch.compile's compilation (inductor/aot_autograd frames in the traceback); try nnUNet_compile=f or fix the compiler toolchain (inferred from the traceback frames)"}
	case crashed && p.sigs[sigUnpackFix].first > 0:
		ev := append(slices.Clone(p.sigs[sigUnpackFix].evidence()), p.generic.evidence()...)
		return verdict{class: CorruptCheckpoint, ev: sortEvidence(ev), file: p.dataFile, inVal: inVal,
			reason: "nnU-Net found truncated or missing unpacked .npy files (\"Error when checking ... fixing\") and then crashed; another run may be unpacking the same dataset at the same time, or the files are corrupt: delete the unpacked .npy files and start one fold first"}
	case crashed && p.sigs[sigEnvWarn].first > 0:
		ev := append(slices.Clone(p.sigs[sigEnvWarn].evidence()), p.generic.evidence()...)
		return verdict{class: ConfigError, ev: sortEvidence(ev), inVal: inVal,
			reason: "an nnU-Net path variable (nnUNet_raw / nnUNet_preprocessed / nnUNet_results) is not set and the trainer then crashed; set the environment variables"}
	case p.generic.first > 0:
		return verdict{class: Unknown, ev: sortEvidence(slices.Clone(p.generic.evidence())), inVal: inVal, file: p.dataFile,
			reason: "the trainer crashed with an exception that matches no known failure: " + snippet(p.generic.ev[0].Text)}
	case p.tbOpen && !(p.sigs[sigDead].first > 0 && p.truncatedUnknown()):
		return p.truncated()
	case p.sigs[sigDead].first > 0:
		return verdict{class: HostOOM, ev: sortEvidence(slices.Clone(p.sigs[sigDead].evidence())), inVal: inVal,
			reason: "data-augmentation workers died without printing an exception of their own: most likely killed by the kernel OOM killer (host RAM); lower nnUNet_n_proc_DA or add RAM"}
	case p.sigs[sigCrash].first > 0:
		return verdict{class: Unknown, ev: sortEvidence(slices.Clone(p.sigs[sigCrash].evidence())), inVal: inVal,
			reason: "the trainer crashed natively: " + snippet(p.sigs[sigCrash].ev[0].Text)}
	case p.tbSeen:
		return verdict{class: Unknown, inVal: inVal, reason: "the log shows a traceback but no recognisable exception"}
	}
	if exit.Known {
		switch {
		case exit.Signal == "SIGKILL" || exit.Code == 137 || exit.Code == -9:
			return verdict{class: HostOOM, inVal: inVal,
				reason: "the trainer was killed by SIGKILL without printing a traceback: most likely the kernel OOM killer (host RAM)"}
		case exit.Signal == "SIGINT" || exit.Code == 130:
			return verdict{class: None, reason: "the trainer was interrupted (SIGINT)"}
		case exit.Signal != "":
			return verdict{class: Unknown, inVal: inVal, reason: "the trainer was killed by " + exit.Signal + " without printing an error"}
		case exit.Code != 0:
			return verdict{class: Unknown, inVal: inVal, reason: "the trainer exited with status " + strconv.Itoa(exit.Code) + " without printing a recognisable error"}
		}
	}
	return verdict{class: None, reason: "no failure in the log"}
}

// truncatedUnknown reports whether truncated would find no cause in the
// cut-off traceback itself (then earlier dead-worker messages explain it:
// the traceback that follows them is their fallout).
func (p *Parser) truncatedUnknown() bool {
	c := p.tbCtx | p.ctxSeen&(ctxTrainStep|ctxForward)
	return c&ctxAugmenter == 0 && !(c&ctxTrainStep != 0 && c&ctxForward != 0 && !p.inValidation) &&
		!(p.inValidation && p.sigs[sigValFallback].first == 0)
}

// truncated handles a log that ends inside a traceback, before its
// exception line (a cut-off paste, or output lost when the process died).
func (p *Parser) truncated() verdict {
	c := p.tbCtx | p.ctxSeen&(ctxTrainStep|ctxForward)
	switch {
	case c&ctxAugmenter != 0:
		ev := []Evidence{p.ctxEv[bit(ctxAugmenter)]}
		return verdict{class: HostOOM, ev: sortEvidence(ev), inVal: p.inValidation,
			reason: "the log ends inside a traceback where the main process waits for a batch from the data-augmentation workers (batchgenerators __get_next_item), before the exception line; what is raised there is the dead-worker error, and with no worker exception printed the usual cause is a worker killed for lack of host RAM (inferred; lower nnUNet_n_proc_DA)"}
	case c&ctxTrainStep != 0 && c&ctxForward != 0 && !p.inValidation:
		ev := []Evidence{p.ctxEv[bit(ctxTrainStep)], p.ctxEv[bit(ctxForward)]}
		return verdict{class: GPUOOM, ev: sortEvidence(ev),
			reason: "the log ends inside a traceback in the network's forward/backward pass of a training step, before the exception line; the usual cause there is CUDA running out of memory (inferred; lower the batch size if it repeats)"}
	case p.inValidation && p.sigs[sigValFallback].first == 0:
		return verdict{class: ValidationExport, inVal: true,
			reason: "the log ends inside a traceback during the final validation, before the exception line; the usual cause there is an export worker killed for lack of host RAM (inferred; rerun with --val and a lower nnUNet_def_n_proc)"}
	}
	return verdict{class: Unknown, inVal: p.inValidation,
		reason: "the log ends inside a traceback, before its exception line: the cause is not in the text"}
}

func (p *Parser) explicit(s sig) verdict {
	r := &p.sigs[s]
	ev := slices.Clone(r.evidence())
	inVal := p.inValidation
	first := ""
	switch {
	case r.exc.Line > 0:
		first = snippet(r.exc.Text)
	case r.nev > 0:
		first = snippet(r.ev[0].Text)
	}
	switch s {
	case sigOOM:
		v := verdict{class: GPUOOM, ru: p.oomRU}
		tried := ""
		if p.oomReq != "" {
			tried = " (tried to allocate " + p.oomReq + ")"
		}
		switch p.oomPhase {
		case "validation":
			v.inVal = true
			v.reason = "CUDA ran out of memory while predicting a case in the final validation" + tried + "; the batch size is not the problem: rerun the validation with --val and more host RAM or fewer export processes"
		case "startup":
			v.reason = "CUDA ran out of memory before the first training step" + tried + "; the GPU may be shared with other processes or the network does not fit"
		case "":
			v.reason = "CUDA ran out of memory" + tried + "; the batch size (or patch size) does not fit on this GPU"
		default:
			v.reason = "CUDA ran out of memory in the training step" + tried + "; the batch size does not fit on this GPU"
		}
		if v.ru {
			v.reason += "; much of the memory is reserved by PyTorch but unallocated (fragmentation), so PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True may help"
		}
		if e := p.ctxEv[bit(ctxTrainStep)]; e.Line > 0 && e.Line < r.first && !v.inVal {
			ev = append(ev, e)
		}
		ev = append(ev, p.sigs[sigValFallback].evidence()...)
		ev = p.withFallout(ev)
		v.ev = sortEvidence(ev)
		return v
	case sigShm:
		return verdict{class: ShmExhausted, ev: sortEvidence(p.withFallout(ev)), inVal: inVal,
			reason: "shared memory (/dev/shm) is full: a data-loader worker could not pass a batch to the main process; enlarge /dev/shm (docker --shm-size or --ipc=host) or lower nnUNet_n_proc_DA"}
	case sigCUDADet:
		return verdict{class: CUDAError, det: true, ev: sortEvidence(p.withFallout(ev)), inVal: inVal,
			reason: "a CUDA device-side assert fired (" + first + "); this is almost always a label value outside the classes declared in dataset.json: check the labels / dataset integrity, a restart will fail the same way"}
	case sigCUDA:
		v := verdict{class: CUDAError, det: r.det, ev: sortEvidence(p.withFallout(ev)), inVal: inVal,
			reason: "a CUDA runtime error crashed the trainer (" + first + "); it can be a GPU/driver fault or an invalid label value hidden by asynchronous reporting"}
		if v.det {
			v.reason = "a CUDA device-side assert fired (" + first + "); check the label values / dataset integrity, a restart will fail the same way"
		}
		return v
	case sigCompile:
		ev = append(ev, p.generic.evidence()...)
		return verdict{class: CompileError, ev: sortEvidence(p.withFallout(ev)), inVal: inVal,
			reason: "torch.compile failed (" + first + "); set nnUNet_compile=f or fix the compiler/Triton installation"}
	case sigDisk:
		return verdict{class: DiskFull, ev: sortEvidence(p.withFallout(ev)), file: p.ckptFile, inVal: inVal,
			reason: "a disk ran out of space or quota (" + first + "); free space on the results, preprocessed or temporary disk"}
	case sigCkpt:
		file := p.ckptFile
		if file == "" {
			file = p.dataFile
		}
		if e := p.ctxEv[bit(ctxLoad)]; e.Line > 0 && e.Line <= r.first {
			ev = append(ev, e)
		}
		return verdict{class: CorruptCheckpoint, ev: sortEvidence(ev), file: file, inVal: inVal,
			reason: "a checkpoint or pickle on disk is truncated or corrupt (" + first + "); move it aside and resume from an older checkpoint or regenerate it"}
	case sigConfig:
		return verdict{class: ConfigError, ev: sortEvidence(ev), inVal: inVal,
			reason: "the run is misconfigured: " + first}
	case sigWorker:
		msg := "its message is not in the log"
		switch {
		case p.workerMsg.Line > 0:
			msg = snippet(p.workerMsg.Text)
		case p.generic.nev > 0:
			msg = snippet(p.generic.ev[0].Text)
			ev = append(ev, p.generic.ev[0])
		}
		v := verdict{class: WorkerError, file: p.dataFile, inVal: inVal,
			reason: "a data-augmentation worker raised an exception (" + msg + ") and the background workers died; fix or regenerate the data it was loading"}
		if v.file != "" {
			v.reason += " (" + v.file + ")"
		}
		v.ev = sortEvidence(p.withFallout(ev))
		return v
	case sigHostMem:
		return verdict{class: HostOOM, ev: sortEvidence(p.withFallout(ev)), inVal: inVal,
			reason: "a process ran out of host RAM (" + first + "); lower nnUNet_n_proc_DA (or nnUNet_def_n_proc in the validation) or add RAM"}
	case sigHostKill:
		return verdict{class: HostOOM, ev: sortEvidence(p.withFallout(ev)), inVal: inVal,
			reason: "the kernel or the job scheduler killed a process for lack of host RAM (" + first + "); lower nnUNet_n_proc_DA or request more memory"}
	case sigExport:
		return verdict{class: ValidationExport, ev: sortEvidence(p.withFallout(ev)), inVal: true,
			reason: "a segmentation-export worker died during the final validation (usually host RAM while resampling); rerun with --val and a lower nnUNet_def_n_proc"}
	case sigInterrupt:
		return verdict{class: None, ev: ev, reason: "the trainer was interrupted (KeyboardInterrupt), not a failure"}
	}
	return verdict{class: Unknown, reason: "unclassified"}
}

// withFallout adds one line of what followed (the dead-worker message), to
// show the chain.
func (p *Parser) withFallout(ev []Evidence) []Evidence {
	if r := &p.sigs[sigDead]; r.nev > 0 && len(ev) < maxEvidence {
		ev = append(ev, r.ev[0])
	}
	return ev
}

func bit(c ctx) int {
	for i := range numCtx {
		if c == 1<<i {
			return i
		}
	}
	return 0
}

// sortEvidence drops empty and duplicate lines, orders by line and keeps at
// most maxEvidence (the earliest ones win ties with later fallout).
func sortEvidence(ev []Evidence) []Evidence {
	out := ev[:0]
	for _, e := range ev {
		if e.Line > 0 {
			out = append(out, e)
		}
	}
	slices.SortFunc(out, func(a, b Evidence) int { return a.Line - b.Line })
	out = slices.CompactFunc(out, func(a, b Evidence) bool { return a.Line == b.Line })
	if len(out) > maxEvidence {
		out = out[:maxEvidence]
	}
	return slices.Clip(out)
}

func snippet(s string) string {
	s = strings.TrimSpace(stripPrefix(s))
	if msg, ok := splitTS(s); ok {
		s = msg
	}
	if len(s) > 160 {
		s = s[:160]
		for len(s) > 0 && s[len(s)-1] >= 0x80 {
			s = s[:len(s)-1]
		}
		s += "…"
	}
	return s
}

// ---------------------------------------------------------------- OOM facts

var (
	sizeRe     = `([0-9][0-9.]*) ?([KMGT]i?B|bytes)`
	reTried    = regexp.MustCompile(`(?i)tried to allocate ` + sizeRe)
	reTotalNew = regexp.MustCompile(`(?i)total capac\w* of ?` + sizeRe)
	reTotalOld = regexp.MustCompile(`(?i)` + sizeRe + ` total capacity`)
	reRU       = regexp.MustCompile(`(?i)` + sizeRe + ` is reserved by PyTorch but unallocated`)
	reAllocOld = regexp.MustCompile(`(?i)` + sizeRe + ` already allocated`)
	reResOld   = regexp.MustCompile(`(?i)` + sizeRe + ` reserved in total by PyTorch`)
)

func parseSize(m []string) float64 {
	if m == nil {
		return -1
	}
	v, err := strconv.ParseFloat(strings.TrimRight(m[1], "."), 64)
	if err != nil {
		return -1
	}
	switch strings.ToUpper(m[2][:1]) {
	case "K":
		v *= 1 << 10
	case "M":
		v *= 1 << 20
	case "G":
		v *= 1 << 30
	case "T":
		v *= 1 << 40
	}
	return v
}

// oomDetails reads the first OOM message's numbers.
//
// ReservedUnallocated rule: the memory PyTorch holds in its cache but has
// not handed out (torch ≥2.1 prints it as "X is reserved by PyTorch but
// unallocated"; older torch prints reserved and allocated, the difference is
// the same) counts as fragmentation when
//
//	(a) it is at least the failed request: the request would have fitted had
//	    that memory been contiguous, and
//	(b) it is significant: ≥ 1 GiB or ≥ 10 % of the GPU's total capacity.
//
// When the request size is not printed, (b) must hold with ≥ 25 % of the
// capacity (or ≥ 1 GiB if the capacity is not printed either). Then
// PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True may avoid the OOM without
// lowering the batch size.
func (p *Parser) oomDetails(line string) {
	if !p.oomPhaseSet {
		p.oomPhaseSet = true
		switch {
		case p.tbCtx&ctxTrainStep != 0: // the traceback's frames say where, whatever came before
			p.oomPhase = "training"
		case p.inValidation || p.valWin:
			p.oomPhase = "validation"
		case p.epoch >= 0:
			p.oomPhase = "training"
		case p.sawTS:
			p.oomPhase = "startup"
		default:
			p.oomPhase = "" // a bare message: phase unknown
		}
	}
	if p.oomReq != "" {
		return
	}
	m := reTried.FindStringSubmatch(line)
	if m == nil {
		return
	}
	p.oomReq = strings.Clone(m[1] + " " + m[2])
	req := parseSize(m)
	total := parseSize(reTotalNew.FindStringSubmatch(line))
	if total < 0 {
		total = parseSize(reTotalOld.FindStringSubmatch(line))
	}
	ru := parseSize(reRU.FindStringSubmatch(line))
	if ru < 0 {
		res, alloc := parseSize(reResOld.FindStringSubmatch(line)), parseSize(reAllocOld.FindStringSubmatch(line))
		if res >= 0 && alloc >= 0 {
			ru = res - alloc
		}
	}
	const gib = 1 << 30
	switch {
	case ru <= 0:
	case req > 0:
		p.oomRU = ru >= req && (ru >= gib || (total > 0 && ru >= 0.10*total))
	case total > 0:
		p.oomRU = ru >= 0.25*total
	default:
		p.oomRU = ru >= gib
	}
}

// ---------------------------------------------------------------- Classify

// Classify reads a whole console log and returns its diagnosis with an
// unknown exit (Diagnose(Exit{})). Lines are split with a Splitter capped at
// DefaultMaxLine bytes. Memory use does not grow with the size of the log.
func Classify(r io.Reader) (Diagnosis, error) {
	p := NewParser()
	s := NewSplitter(DefaultMaxLine, func(line []byte) {
		// The parser clones whatever it keeps, so no copy is needed here.
		p.Feed(unsafe.String(unsafe.SliceData(line), len(line)))
	})
	buf := make([]byte, 256<<10)
	for {
		n, err := r.Read(buf)
		if n > 0 {
			s.Write(buf[:n]) //nolint:errcheck // never fails
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			s.Flush()
			return p.Diagnose(Exit{}), fmt.Errorf("logparse: read: %w", err)
		}
	}
	s.Flush()
	return p.Diagnose(Exit{}), nil
}
