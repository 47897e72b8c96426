package nnunet

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"time"

	"github.com/nnguard/nnguard/internal/atomicfile"
)

// FoldStatus describes a fold folder (FoldDir) as nnguard sees it.
type FoldStatus struct {
	Dir                 string
	Final, Latest, Best Checkpoint
	SummaryExists       bool // validation/summary.json exists
	// Complete: checkpoint_final.pth is valid and validation/summary.json
	// exists; nothing left to do.
	Complete bool
	// NeedsValidationOnly: checkpoint_final.pth is valid but the final
	// validation did not finish; rerun with --val.
	NeedsValidationOnly bool
}

// Checkpoints returns final, latest and best, in the order --c looks.
func (s FoldStatus) Checkpoints() []Checkpoint {
	return []Checkpoint{s.Final, s.Latest, s.Best}
}

// ContinueFrom is the checkpoint nnU-Net's --c would load now: the first of
// final, latest, best that exists (nnU-Net checks existence only, so this
// may be an invalid one). ok is false when none exists.
func (s FoldStatus) ContinueFrom() (c Checkpoint, ok bool) {
	for _, c := range s.Checkpoints() {
		if c.Exists {
			return c, true
		}
	}
	return Checkpoint{}, false
}

// FoldState inspects the checkpoints and the validation summary of a fold
// folder. A folder that does not exist yet is a fold with nothing in it
// (no error).
func FoldState(dir string) (FoldStatus, error) {
	s := FoldStatus{Dir: dir}
	st, err := os.Stat(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
	case err != nil:
		return s, fmt.Errorf("nnunet: fold folder %s: %w", dir, err)
	case !st.IsDir():
		return s, fmt.Errorf("nnunet: fold folder %s is not a folder", dir)
	}
	s.Final = Inspect(filepath.Join(dir, CheckpointFinal))
	s.Latest = Inspect(filepath.Join(dir, CheckpointLatest))
	s.Best = Inspect(filepath.Join(dir, CheckpointBest))
	if st, err := os.Stat(filepath.Join(dir, "validation", "summary.json")); err == nil && st.Mode().IsRegular() {
		s.SummaryExists = true
	}
	s.Complete = s.Final.Valid && s.SummaryExists
	s.NeedsValidationOnly = s.Final.Valid && !s.SummaryExists
	return s, nil
}

// Move is one change PrepareResume made in a fold folder. Paths are full
// paths. Copy is true when From was copied to To (From is unchanged);
// otherwise From was renamed to To.
type Move struct {
	From, To string
	Why      string
	Copy     bool
}

// ResumePlan is what PrepareResume did and what --c will load.
type ResumePlan struct {
	Dir string
	// From is the checkpoint --c will load: CheckpointFinal,
	// CheckpointLatest, CheckpointBest, or "" when there is none.
	From  string
	Epoch int // From's current_epoch (the next epoch to run); -1 if none
	// HasCheckpoint: pass --c only when true (nnU-Net 2.0/2.1 crash on --c
	// without a checkpoint; later versions start from scratch).
	HasCheckpoint bool
	Moves         []Move
	Backups       []string // backups (hard links or copies) under <Dir>/nnguard/checkpoint-backups
	Status        FoldStatus
	// Warnings are things that did not work but did not stop the resume.
	Warnings []string
}

// BackupDir is where PrepareResume keeps copies of the checkpoints it
// changes, relative to the fold folder.
const BackupDir = "nnguard/checkpoint-backups"

// backupsKept is how many backups per checkpoint name PrepareResume keeps.
const backupsKept = 3

const stampLayout = "20060102T150405Z"

// PrepareResume arranges a fold folder so that nnU-Net's --c (which takes
// final, then latest, then best, checking only that the file exists) loads
// the newest valid checkpoint:
//
//   - a corrupt checkpoint_final/latest/best.pth is renamed to
//     <name>.corrupt-<YYYYmmddTHHMMSSZ> (never deleted);
//   - if checkpoint_final.pth is not valid and checkpoint_best.pth is valid
//     with a higher epoch than checkpoint_latest.pth (or latest is missing
//     or was corrupt), latest is renamed to
//     checkpoint_latest.pth.older-than-best-<ts> and a copy of best is put
//     in its place (best itself is untouched);
//   - before a file is renamed, a copy is kept in <dir>/nnguard/checkpoint-
//     backups/<name>.<ts> (the newest 3 per name are kept; only nnguard's
//     own older backups there are pruned).
//
// Every rename fsyncs the folder; copies are atomic. Calling it again
// without changes in between changes nothing. now names the moved files.
// A failure leaves a state that --c can still use and that a later call
// completes.
func PrepareResume(dir string, now time.Time) (ResumePlan, error) {
	plan := ResumePlan{Dir: dir, Epoch: -1}
	st, err := FoldState(dir)
	if err != nil {
		return plan, err
	}
	ts := now.UTC().Format(stampLayout)
	for _, c := range st.Checkpoints() {
		if !c.Exists || c.Valid {
			continue
		}
		why := fmt.Sprintf("corrupt, --c would pick it and fail: %v", c.Err)
		if err := plan.moveAside(c, c.Name+".corrupt-"+ts, why, ts); err != nil {
			return plan, err
		}
	}
	latestOK := st.Latest.Valid
	if !st.Final.Valid && st.Best.Valid && (!latestOK || st.Best.Epoch > st.Latest.Epoch) {
		if latestOK {
			why := fmt.Sprintf("checkpoint_best.pth (epoch %d) is newer than checkpoint_latest.pth (epoch %d)", st.Best.Epoch, st.Latest.Epoch)
			if err := plan.moveAside(st.Latest, CheckpointLatest+".older-than-best-"+ts, why, ts); err != nil {
				return plan, err
			}
		}
		dst := filepath.Join(dir, CheckpointLatest)
		why := fmt.Sprintf("resume from the newest valid state (epoch %d)", st.Best.Epoch)
		if !latestOK {
			why = fmt.Sprintf("no valid checkpoint_latest.pth; resume from checkpoint_best.pth (epoch %d)", st.Best.Epoch)
		}
		if err := copyWritable(st.Best.Path, dst); err != nil {
			// With latest gone, --c falls back to best anyway: the copy is a
			// convenience, a full disk must not stop the resume.
			plan.Warnings = append(plan.Warnings, fmt.Sprintf("could not copy checkpoint_best.pth to checkpoint_latest.pth (%v); --c resumes from checkpoint_best.pth", err))
		} else {
			plan.Moves = append(plan.Moves, Move{From: st.Best.Path, To: dst, Why: why, Copy: true})
		}
	}
	if st, err = FoldState(dir); err != nil {
		return plan, err
	}
	plan.Status = st
	if c, ok := st.ContinueFrom(); ok {
		if !c.Valid { // changed under our feet
			return plan, fmt.Errorf("nnunet: %s is still not a valid checkpoint after preparing the resume: %v", c.Path, c.Err)
		}
		plan.From, plan.Epoch, plan.HasCheckpoint = c.Name, c.Epoch, true
	}
	return plan, nil
}

// copyWritable copies src to dst atomically and makes dst writable by its
// owner: nnU-Net overwrites checkpoint_latest.pth at its next save.
func copyWritable(src, dst string) error {
	if err := atomicfile.CopyFile(src, dst); err != nil {
		return err
	}
	st, err := os.Stat(dst)
	if err != nil {
		return err
	}
	return os.Chmod(dst, st.Mode().Perm()|0o200)
}

// moveAside backs c up and renames it to newName in the same folder,
// without overwriting anything.
func (plan *ResumePlan) moveAside(c Checkpoint, newName, why, ts string) error {
	dir := filepath.Dir(c.Path)
	b, err := backup(c, ts)
	if err != nil {
		return err
	}
	if b != "" {
		plan.Backups = append(plan.Backups, b)
	}
	dst, err := freeName(dir, newName)
	if err != nil {
		return err
	}
	if err := os.Rename(c.Path, dst); err != nil {
		return fmt.Errorf("nnunet: move %s aside: %w", c.Path, err)
	}
	if err := atomicfile.SyncDir(dir); err != nil {
		return fmt.Errorf("nnunet: %w", err)
	}
	plan.Moves = append(plan.Moves, Move{From: c.Path, To: dst, Why: why})
	return nil
}

// freeName returns dir/name, or dir/name-2, -3, ... if taken.
func freeName(dir, name string) (string, error) {
	for i := 1; i < 1000; i++ {
		n := name
		if i > 1 {
			n += "-" + strconv.Itoa(i)
		}
		p := filepath.Join(dir, n)
		if _, err := os.Lstat(p); errors.Is(err, fs.ErrNotExist) {
			return p, nil
		} else if err != nil {
			return "", fmt.Errorf("nnunet: %w", err)
		}
	}
	return "", fmt.Errorf("nnunet: no free name for %s in %s", name, dir)
}

// backup copies a regular checkpoint file to the backup folder and prunes
// older backups of the same name. Non-regular files are not copied.
func backup(c Checkpoint, ts string) (string, error) {
	st, err := os.Lstat(c.Path)
	if err != nil {
		return "", fmt.Errorf("nnunet: back up %s: %w", c.Path, err)
	}
	if !st.Mode().IsRegular() {
		return "", nil
	}
	bdir := filepath.Join(filepath.Dir(c.Path), filepath.FromSlash(BackupDir))
	if err := os.MkdirAll(bdir, 0o755); err != nil {
		return "", fmt.Errorf("nnunet: back up %s: %w", c.Path, err)
	}
	dst, err := freeName(bdir, c.Name+"."+ts)
	if err != nil {
		return "", err
	}
	// A hard link keeps the bytes without using space (the file itself is
	// only renamed aside, never written to, so the link stays intact); a
	// copy where links are impossible.
	if err := os.Link(c.Path, dst); err != nil {
		if err := atomicfile.CopyFile(c.Path, dst); err != nil {
			return "", fmt.Errorf("nnunet: back up %s: %w", c.Path, err)
		}
	}
	if err := pruneBackups(bdir, c.Name); err != nil {
		return dst, err
	}
	return dst, nil
}

// pruneBackups keeps the newest backupsKept backups named
// <name>.<YYYYmmddTHHMMSSZ>[-N] in bdir and removes older ones. Other files
// are never touched.
func pruneBackups(bdir, name string) error {
	re := regexp.MustCompile(`^` + regexp.QuoteMeta(name) + `\.(\d{8}T\d{6}Z)(?:-(\d+))?$`)
	entries, err := os.ReadDir(bdir)
	if err != nil {
		return fmt.Errorf("nnunet: prune backups: %w", err)
	}
	type bk struct {
		name string
		ts   string
		seq  int
	}
	var bks []bk
	for _, e := range entries {
		m := re.FindStringSubmatch(e.Name())
		if m == nil || !e.Type().IsRegular() {
			continue
		}
		seq := 1
		if m[2] != "" {
			seq, _ = strconv.Atoi(m[2])
		}
		bks = append(bks, bk{e.Name(), m[1], seq})
	}
	if len(bks) <= backupsKept {
		return nil
	}
	sort.Slice(bks, func(i, j int) bool {
		if bks[i].ts != bks[j].ts {
			return bks[i].ts > bks[j].ts
		}
		return bks[i].seq > bks[j].seq
	})
	for _, b := range bks[backupsKept:] {
		if err := os.Remove(filepath.Join(bdir, b.name)); err != nil {
			return fmt.Errorf("nnunet: prune backups: %w", err)
		}
	}
	return atomicfile.SyncDir(bdir)
}
