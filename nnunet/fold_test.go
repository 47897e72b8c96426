package nnunet

import (
	"bytes"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"
)

var now = time.Date(2026, 7, 3, 9, 0, 5, 0, time.UTC)

const stamp = "20260703T090005Z"

// foldWith copies fixtures into a new fold folder: name in fold → fixture.
func foldWith(t *testing.T, files map[string]string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "fold_0")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, fx := range files {
		data, err := os.ReadFile(fixture(t, fx))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func listDir(t *testing.T, dir string) []string {
	t.Helper()
	var names []string
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			r, _ := filepath.Rel(dir, p)
			names = append(names, filepath.ToSlash(r))
		}
		return nil
	})
	sort.Strings(names)
	return names
}

func sameBytes(t *testing.T, a, b string) bool {
	t.Helper()
	x, err1 := os.ReadFile(a)
	y, err2 := os.ReadFile(b)
	return err1 == nil && err2 == nil && bytes.Equal(x, y)
}

func TestFoldState(t *testing.T) {
	dir := foldWith(t, map[string]string{CheckpointFinal: "checkpoint_final.pth", CheckpointBest: "checkpoint_best.pth"})
	s, err := FoldState(dir)
	if err != nil {
		t.Fatal(err)
	}
	if !s.Final.Valid || s.Final.Epoch != 6 || s.Latest.Exists || !s.Best.Valid || s.Complete || !s.NeedsValidationOnly {
		t.Fatalf("state: %+v", s)
	}
	os.MkdirAll(filepath.Join(dir, "validation"), 0o755)
	os.WriteFile(filepath.Join(dir, "validation", "summary.json"), []byte("{}"), 0o644)
	s, _ = FoldState(dir)
	if !s.Complete || s.NeedsValidationOnly {
		t.Fatalf("state after summary: %+v", s)
	}
	// Missing folder: nothing, no error.
	s, err = FoldState(filepath.Join(t.TempDir(), "nope"))
	if err != nil || s.Final.Exists || s.Complete {
		t.Fatalf("missing folder: %+v %v", s, err)
	}
	// A corrupt final is neither complete nor validation-only.
	dir = foldWith(t, map[string]string{CheckpointFinal: "checkpoint_latest_truncated.pth"})
	os.MkdirAll(filepath.Join(dir, "validation"), 0o755)
	os.WriteFile(filepath.Join(dir, "validation", "summary.json"), []byte("{}"), 0o644)
	s, _ = FoldState(dir)
	if s.Complete || s.NeedsValidationOnly || !s.Final.Exists || s.Final.Valid {
		t.Fatalf("corrupt final: %+v", s)
	}
}

func TestPrepareResumeBestNewerThanLatest(t *testing.T) {
	dir := foldWith(t, map[string]string{CheckpointLatest: "checkpoint_latest.pth", CheckpointBest: "checkpoint_best.pth"})
	plan, err := PrepareResume(dir, now)
	if err != nil {
		t.Fatal(err)
	}
	if !plan.HasCheckpoint || plan.From != CheckpointLatest || plan.Epoch != 6 {
		t.Fatalf("plan: %+v", plan)
	}
	aside := filepath.Join(dir, "checkpoint_latest.pth.older-than-best-"+stamp)
	if !sameBytes(t, aside, fixture(t, "checkpoint_latest.pth")) {
		t.Fatal("old latest not moved aside intact")
	}
	if !sameBytes(t, filepath.Join(dir, CheckpointLatest), fixture(t, "checkpoint_best.pth")) {
		t.Fatal("latest is not a copy of best")
	}
	if !sameBytes(t, filepath.Join(dir, CheckpointBest), fixture(t, "checkpoint_best.pth")) {
		t.Fatal("best changed")
	}
	bk := filepath.Join(dir, "nnguard", "checkpoint-backups", "checkpoint_latest.pth."+stamp)
	if !sameBytes(t, bk, fixture(t, "checkpoint_latest.pth")) {
		t.Fatal("no backup of the old latest")
	}
	if len(plan.Moves) != 2 || plan.Moves[0].To != aside || plan.Moves[1].Copy != true || len(plan.Backups) != 1 {
		t.Fatalf("moves: %+v backups %v", plan.Moves, plan.Backups)
	}
	before := listDir(t, dir)
	// Idempotent: a second call changes nothing.
	plan2, err := PrepareResume(dir, now.Add(time.Hour))
	if err != nil {
		t.Fatal(err)
	}
	if len(plan2.Moves) != 0 || plan2.From != CheckpointLatest || plan2.Epoch != 6 {
		t.Fatalf("second plan: %+v", plan2)
	}
	if after := listDir(t, dir); strings.Join(after, ",") != strings.Join(before, ",") {
		t.Fatalf("second call changed files: %v -> %v", before, after)
	}
}

func TestPrepareResumeTruncatedLatest(t *testing.T) {
	dir := foldWith(t, map[string]string{CheckpointLatest: "checkpoint_latest_truncated.pth", CheckpointBest: "checkpoint_best.pth"})
	plan, err := PrepareResume(dir, now)
	if err != nil {
		t.Fatal(err)
	}
	corrupt := filepath.Join(dir, "checkpoint_latest.pth.corrupt-"+stamp)
	if !sameBytes(t, corrupt, fixture(t, "checkpoint_latest_truncated.pth")) {
		t.Fatal("truncated latest not moved aside with a .corrupt name")
	}
	if !plan.HasCheckpoint || plan.Epoch != 6 || plan.From != CheckpointLatest {
		t.Fatalf("plan: %+v", plan)
	}
	if !sameBytes(t, filepath.Join(dir, CheckpointLatest), fixture(t, "checkpoint_best.pth")) {
		t.Fatal("best not copied into latest")
	}
	if !strings.Contains(plan.Moves[0].Why, "corrupt") {
		t.Fatalf("why: %q", plan.Moves[0].Why)
	}
	if _, err := os.Stat(filepath.Join(dir, "nnguard", "checkpoint-backups", "checkpoint_latest.pth."+stamp)); err != nil {
		t.Fatalf("no backup of the corrupt file: %v", err)
	}
}

func TestPrepareResumeOnlyCorrupt(t *testing.T) {
	dir := foldWith(t, map[string]string{CheckpointLatest: "checkpoint_latest_truncated.pth"})
	plan, err := PrepareResume(dir, now)
	if err != nil {
		t.Fatal(err)
	}
	if plan.HasCheckpoint || plan.From != "" || plan.Epoch != -1 || len(plan.Moves) != 1 {
		t.Fatalf("plan: %+v", plan)
	}
	if _, err := os.Stat(filepath.Join(dir, CheckpointLatest)); !os.IsNotExist(err) {
		t.Fatal("corrupt latest still in place")
	}
}

func TestPrepareResumeNothing(t *testing.T) {
	plan, err := PrepareResume(filepath.Join(t.TempDir(), "fold_0"), now)
	if err != nil || plan.HasCheckpoint || plan.From != "" || len(plan.Moves) != 0 {
		t.Fatalf("plan %+v err %v", plan, err)
	}
	dir := foldWith(t, nil)
	plan, err = PrepareResume(dir, now)
	if err != nil || plan.HasCheckpoint || len(listDir(t, dir)) != 0 {
		t.Fatalf("plan %+v err %v files %v", plan, err, listDir(t, dir))
	}
}

func TestPrepareResumeFinal(t *testing.T) {
	dir := foldWith(t, map[string]string{
		CheckpointFinal: "checkpoint_final.pth", CheckpointLatest: "checkpoint_latest.pth", CheckpointBest: "checkpoint_best.pth",
	})
	plan, err := PrepareResume(dir, now)
	if err != nil {
		t.Fatal(err)
	}
	if plan.From != CheckpointFinal || plan.Epoch != 6 || len(plan.Moves) != 0 || !plan.Status.NeedsValidationOnly {
		t.Fatalf("plan: %+v", plan)
	}
	if !sameBytes(t, filepath.Join(dir, CheckpointLatest), fixture(t, "checkpoint_latest.pth")) {
		t.Fatal("latest changed although final wins")
	}
}

func TestPrepareResumeLatestNewer(t *testing.T) {
	// latest (4) newer than best: swap roles by naming best's fixture "latest".
	dir := foldWith(t, map[string]string{CheckpointLatest: "checkpoint_best.pth", CheckpointBest: "checkpoint_latest.pth"})
	plan, err := PrepareResume(dir, now)
	if err != nil || plan.From != CheckpointLatest || plan.Epoch != 6 || len(plan.Moves) != 0 {
		t.Fatalf("plan %+v err %v", plan, err)
	}
}

func TestPrepareResumeCorruptFinal(t *testing.T) {
	dir := foldWith(t, map[string]string{CheckpointFinal: "checkpoint_latest_truncated.pth", CheckpointBest: "checkpoint_best.pth"})
	plan, err := PrepareResume(dir, now)
	if err != nil {
		t.Fatal(err)
	}
	if plan.From != CheckpointLatest || plan.Epoch != 6 {
		t.Fatalf("plan: %+v", plan)
	}
	if _, err := os.Stat(filepath.Join(dir, "checkpoint_final.pth.corrupt-"+stamp)); err != nil {
		t.Fatal(err)
	}
}

func TestPrepareResumeBackupsBounded(t *testing.T) {
	dir := foldWith(t, map[string]string{CheckpointBest: "checkpoint_best.pth"})
	bdir := filepath.Join(dir, "nnguard", "checkpoint-backups")
	os.MkdirAll(bdir, 0o755)
	// A file of the user's in the backup folder is never pruned.
	os.WriteFile(filepath.Join(bdir, "notes.txt"), []byte("mine"), 0o644)
	for i := 0; i < 5; i++ {
		// each round: a truncated latest appears and gets moved aside
		data, _ := os.ReadFile(fixture(t, "checkpoint_latest_truncated.pth"))
		os.WriteFile(filepath.Join(dir, CheckpointLatest), data, 0o644)
		if _, err := PrepareResume(dir, now.Add(time.Duration(i)*time.Minute)); err != nil {
			t.Fatal(err)
		}
		// the copy of best written in round i-1 is valid: make latest corrupt again
	}
	var backups []string
	for _, n := range listDir(t, bdir) {
		if strings.HasPrefix(n, CheckpointLatest+".") {
			backups = append(backups, n)
		}
	}
	if len(backups) != backupsKept {
		t.Fatalf("backups: %v", listDir(t, bdir))
	}
	if backups[0] != "checkpoint_latest.pth.20260703T090205Z" {
		t.Fatalf("oldest kept backup %s, want the third round's", backups[0])
	}
	if _, err := os.Stat(filepath.Join(bdir, "notes.txt")); err != nil {
		t.Fatal("a foreign file in the backup folder was removed")
	}
	// All five corrupt files stay in the fold folder: never deleted.
	n := 0
	for _, f := range listDir(t, dir) {
		if strings.Contains(f, ".corrupt-") {
			n++
		}
	}
	if n != 5 {
		t.Fatalf("%d corrupt files kept, want 5: %v", n, listDir(t, dir))
	}
}

func TestPrepareResumeSameSecond(t *testing.T) {
	dir := foldWith(t, map[string]string{CheckpointLatest: "checkpoint_latest_truncated.pth"})
	if _, err := PrepareResume(dir, now); err != nil {
		t.Fatal(err)
	}
	data, _ := os.ReadFile(fixture(t, "checkpoint_latest_truncated.pth"))
	os.WriteFile(filepath.Join(dir, CheckpointLatest), data, 0o644)
	plan, err := PrepareResume(dir, now)
	if err != nil {
		t.Fatal(err)
	}
	if want := filepath.Join(dir, "checkpoint_latest.pth.corrupt-"+stamp+"-2"); plan.Moves[0].To != want {
		t.Fatalf("second move to %s, want %s", plan.Moves[0].To, want)
	}
}

func TestPrepareResumeSimulator(t *testing.T) {
	dir := foldWith(t, nil)
	simCheckpoint(t, filepath.Join(dir, CheckpointLatest), 2)
	simCheckpoint(t, filepath.Join(dir, CheckpointBest), 5)
	plan, err := PrepareResume(dir, now)
	if err != nil || plan.From != CheckpointLatest || plan.Epoch != 5 || len(plan.Moves) != 2 {
		t.Fatalf("plan %+v err %v", plan, err)
	}
}

func TestPrepareResumeBackupIsAHardLinkAndCopyIsWritable(t *testing.T) {
	dir := foldWith(t, map[string]string{CheckpointLatest: "checkpoint_latest.pth", CheckpointBest: "checkpoint_best.pth"})
	// a read-only best (copied with its mode) must not give a read-only latest
	if err := os.Chmod(filepath.Join(dir, CheckpointBest), 0o444); err != nil {
		t.Fatal(err)
	}
	if _, err := PrepareResume(dir, now); err != nil {
		t.Fatal(err)
	}
	aside, err := os.Stat(filepath.Join(dir, "checkpoint_latest.pth.older-than-best-"+stamp))
	if err != nil {
		t.Fatal(err)
	}
	bk, err := os.Stat(filepath.Join(dir, "nnguard", "checkpoint-backups", "checkpoint_latest.pth."+stamp))
	if err != nil {
		t.Fatal(err)
	}
	if !os.SameFile(aside, bk) {
		t.Fatal("the backup should share the moved-aside file's bytes (a hard link), not use space again")
	}
	latest, err := os.Stat(filepath.Join(dir, CheckpointLatest))
	if err != nil {
		t.Fatal(err)
	}
	if latest.Mode().Perm()&0o200 == 0 {
		t.Fatalf("promoted latest is %v: nnU-Net could not overwrite it at its next save", latest.Mode())
	}
}
