package nnunet

import (
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"unicode"
)

// Env holds nnU-Net's three folders, from the environment variables
// nnUNet_raw, nnUNet_preprocessed and nnUNet_results.
type Env struct {
	Raw          string // nnUNet_raw; optional for training, may be empty
	Preprocessed string // nnUNet_preprocessed; required
	Results      string // nnUNet_results; required
}

// EnvFrom reads the nnU-Net folders through getenv (os.Getenv in
// production). nnUNet_preprocessed and nnUNet_results must be set and name
// existing folders; nnUNet_raw is not needed for training and is neither
// required nor checked. Errors wrap ErrConfig.
func EnvFrom(getenv func(string) string) (Env, error) {
	env := Env{
		Raw:          getenv("nnUNet_raw"),
		Preprocessed: getenv("nnUNet_preprocessed"),
		Results:      getenv("nnUNet_results"),
	}
	for _, v := range []struct{ name, value, what string }{
		{"nnUNet_preprocessed", env.Preprocessed, "the folder that holds the preprocessed datasets"},
		{"nnUNet_results", env.Results, "the folder where trained models go"},
	} {
		if strings.TrimSpace(v.value) == "" {
			return Env{}, configErrorf("nnunet: %s is not set: export %s=<%s>", v.name, v.name, v.what)
		}
		st, err := os.Stat(v.value)
		if errors.Is(err, fs.ErrNotExist) && v.name == "nnUNet_results" {
			// nnU-Net creates its results folder (and nnguard the fold's)
			// as long as the parent exists
			if pst, perr := os.Stat(filepath.Dir(filepath.Clean(v.value))); perr == nil && pst.IsDir() {
				continue
			}
		}
		switch {
		case errors.Is(err, fs.ErrNotExist):
			return Env{}, configWrap(err, "nnunet: %s=%s does not exist: create it or point %s at %s", v.name, v.value, v.name, v.what)
		case err != nil:
			return Env{}, configWrap(err, "nnunet: %s=%s: %v", v.name, v.value, err)
		case !st.IsDir():
			return Env{}, configErrorf("nnunet: %s=%s is not a folder: point %s at %s", v.name, v.value, v.name, v.what)
		}
	}
	return env, nil
}

var datasetNameRE = regexp.MustCompile(`^Dataset\d{3,}_.+$`)

// FindDataset returns the dataset folder inside preprocessed for a dataset
// id ("4", as nnU-Net converts it with Python's int()) or name
// ("Dataset004_Hippocampus"). An id is turned into the prefix
// fmt.Sprintf("Dataset%03d", id) and must match exactly one sub-folder, as
// nnU-Net's convert_id_to_dataset_name does (it matches by prefix too).
// A missing, ambiguous or malformed dataset wraps ErrConfig and lists the
// datasets that exist.
func FindDataset(preprocessed, idOrName string) (string, error) {
	idOrName = strings.TrimRight(idOrName, `/\`) // a folder name from tab completion
	if strings.HasPrefix(idOrName, "Dataset") {
		if !datasetNameRE.MatchString(idOrName) || strings.ContainsAny(idOrName, `/\`) {
			return "", configErrorf("nnunet: dataset %q is not a valid dataset name: use an id like 4 or a name like Dataset004_Hippocampus (pattern DatasetXXX_YYY)", idOrName)
		}
		dir := filepath.Join(preprocessed, idOrName)
		st, err := os.Stat(dir)
		if err == nil && st.IsDir() {
			return dir, nil
		}
		return "", configErrorf("nnunet: dataset %s not found in nnUNet_preprocessed=%s (run nnUNetv2_plan_and_preprocess first); found: %s", idOrName, preprocessed, listDatasets(preprocessed))
	}
	id, ok := pyInt(idOrName)
	if !ok {
		return "", configErrorf("nnunet: dataset_name_or_id %q must either be an integer or a valid dataset name with the pattern DatasetXXX_YYY where XXX are the three(!) task ID digits", idOrName)
	}
	prefix := "Dataset" + fmt.Sprintf("%03d", id)
	entries, err := os.ReadDir(preprocessed)
	if err != nil {
		return "", configWrap(err, "nnunet: cannot read nnUNet_preprocessed=%s: %v", preprocessed, err)
	}
	var found []string
	for _, e := range entries {
		if isDir(preprocessed, e) && strings.HasPrefix(e.Name(), prefix) {
			found = append(found, e.Name())
		}
	}
	switch len(found) {
	case 1:
		return filepath.Join(preprocessed, found[0]), nil
	case 0:
		return "", configErrorf("nnunet: no dataset with id %s in nnUNet_preprocessed=%s (run nnUNetv2_plan_and_preprocess -d %s first); found: %s", id, preprocessed, id, listDatasets(preprocessed))
	default:
		return "", configErrorf("nnunet: more than one dataset with id %s in nnUNet_preprocessed=%s: %s; rename or remove all but one, or pass the full name", id, preprocessed, strings.Join(found, ", "))
	}
}

func isDir(parent string, e fs.DirEntry) bool {
	if e.IsDir() {
		return true
	}
	if e.Type()&fs.ModeSymlink != 0 {
		st, err := os.Stat(filepath.Join(parent, e.Name()))
		return err == nil && st.IsDir()
	}
	return false
}

// listDatasets names the Dataset* folders in dir, for error messages.
func listDatasets(dir string) string {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return "(cannot read the folder: " + err.Error() + ")"
	}
	var names []string
	for _, e := range entries {
		if isDir(dir, e) && strings.HasPrefix(e.Name(), "Dataset") {
			names = append(names, e.Name())
		}
	}
	if len(names) == 0 {
		return "no Dataset* folders"
	}
	sort.Strings(names)
	return strings.Join(names, ", ")
}

// pyInt parses s like Python's int(str): surrounding whitespace, an optional
// sign, decimal digits with single underscores between them, leading zeros
// allowed. It returns the value in canonical decimal form.
func pyInt(s string) (*big.Int, bool) {
	s = strings.TrimFunc(s, unicode.IsSpace)
	if s == "" {
		return nil, false
	}
	sign := ""
	if s[0] == '+' || s[0] == '-' {
		if s[0] == '-' {
			sign = "-"
		}
		s = s[1:]
	}
	if s == "" || s[0] == '_' || s[len(s)-1] == '_' || strings.Contains(s, "__") {
		return nil, false
	}
	digits := strings.ReplaceAll(s, "_", "")
	for _, r := range digits {
		if r < '0' || r > '9' {
			return nil, false
		}
	}
	n, ok := new(big.Int).SetString(sign+digits, 10)
	return n, ok
}

// CanonicalFold returns the fold as nnU-Net names its folder: "all", or the
// integer that Python's int() makes of s ("+01 " → "1"). Negative folds are
// rejected (nnU-Net would silently index the splits from the end). Errors
// wrap ErrConfig.
func CanonicalFold(s string) (string, error) {
	if s == "all" {
		return s, nil
	}
	n, ok := pyInt(s)
	if !ok {
		return "", configErrorf("nnunet: fold %q is not valid: use 'all' or a fold number such as 0", s)
	}
	if n.Sign() < 0 {
		return "", configErrorf("nnunet: fold %q is negative: use 'all' or a fold number such as 0", s)
	}
	return n.String(), nil
}

// ValidFold accepts "all" or a non-negative integer as Python's int()
// reads it. Errors wrap ErrConfig.
func ValidFold(s string) error {
	_, err := CanonicalFold(s)
	return err
}

// FoldDir is the folder nnUNetv2_train writes a fold to:
// <results>/<dataset_name>/<trainer>__<plans_name>__<configuration>/fold_<fold>.
// datasetName and plansName are the values INSIDE the plans file
// (Plans.DatasetName, Plans.Name), not the -p identifier. A valid fold is
// written in canonical form ("01" → "1"), as nnU-Net does.
func FoldDir(env Env, datasetName, trainer, plansName, configuration, fold string) string {
	if f, err := CanonicalFold(fold); err == nil {
		fold = f
	}
	return filepath.Join(TrainingDir(env, datasetName, trainer, plansName, configuration), "fold_"+fold)
}

// TrainingDir is the folder shared by all folds of one training
// (nnU-Net's output_folder_base; holds plans.json, dataset.json).
func TrainingDir(env Env, datasetName, trainer, plansName, configuration string) string {
	return filepath.Join(env.Results, datasetName, trainer+"__"+plansName+"__"+configuration)
}
