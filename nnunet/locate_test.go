package nnunet

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"
)

func TestLocate(t *testing.T) {
	plansPath := writePlans(t, plansJSON)
	env := Env{Preprocessed: filepath.Dir(filepath.Dir(plansPath)), Results: t.TempDir()}
	a, err := ParseTrainArgs(strings.Fields("4 3d_fullres 1 -tr T"))
	if err != nil {
		t.Fatal(err)
	}
	tr, err := Locate(env, a)
	if err != nil {
		t.Fatal(err)
	}
	want := filepath.Join(env.Results, "Dataset004_Hippocampus", "T__nnUNetPlans__3d_fullres", "fold_1")
	if tr.FoldDir != want || tr.Plans.Path != plansPath {
		t.Fatalf("Locate: %+v", tr)
	}
	// A derived plans file lands in the same folder.
	id := DerivedIdentifier(tr.Plans.Identifier, "3d_fullres", "1", 4)
	if _, err := tr.Plans.Derive("3d_fullres", 4, id); err != nil {
		t.Fatal(err)
	}
	a.Plans = id
	tr2, err := Locate(env, a)
	if err != nil || tr2.FoldDir != want {
		t.Fatalf("derived: %+v %v", tr2, err)
	}
	if bs, _ := tr2.Plans.BatchSize("3d_fullres"); bs != 4 {
		t.Fatalf("derived batch size %d", bs)
	}
	for _, line := range []string{"4 3d_nope 0", "5 3d_fullres 0", "4 3d_fullres 0 -p Nope"} {
		a, _ := ParseTrainArgs(strings.Fields(line))
		if _, err := Locate(env, a); !errors.Is(err, ErrConfig) {
			t.Errorf("%q: %v", line, err)
		}
	}
}
