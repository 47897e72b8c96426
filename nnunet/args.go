package nnunet

import (
	"regexp"
	"strconv"
	"strings"
)

// nnUNetv2_train's defaults for the options that have one.
const (
	DefaultTrainer = "nnUNetTrainer"
	DefaultDevice  = "cuda"
	DefaultNumGPUs = 1
)

// TrainArgs is an nnUNetv2_train command line (without the program name).
// After ParseTrainArgs every field holds the effective value, defaults
// included (Trainer "nnUNetTrainer", Plans "nnUNetPlans", NumGPUs 1, Device
// "cuda"). Rest holds the arguments nnguard does not know, in order.
type TrainArgs struct {
	Dataset, Configuration, Fold string // the three positional arguments
	Trainer                      string // -tr
	Plans                        string // -p (plans identifier)
	PretrainedWeights            string // -pretrained_weights
	Continue                     bool   // --c
	ValOnly                      bool   // --val
	ValBest                      bool   // --val_best
	NPZ                          bool   // --npz
	DisableCheckpointing         bool   // --disable_checkpointing
	UseCompressed                bool   // --use_compressed (nnU-Net ≤ 2.5.2 only)
	NumGPUs                      int    // -num_gpus
	Device                       string // -device
	Rest                         []string

	toks []argTok // the command line as given, for Argv
}

type tokKind int

const (
	tokPositional tokKind = iota // Dataset, Configuration, Fold by index
	tokOption                    // a known option
	tokRest                      // Rest[index]
	tokDoubleDash                // "--"
)

type argTok struct {
	kind   tokKind
	index  int    // positional index or Rest index
	name   string // known option name
	equals bool   // given as -opt=value
	value  string // value as given (valued options)
}

// options nnguard understands; true = takes a value.
var knownOptions = map[string]bool{
	"-tr": true, "-p": true, "-pretrained_weights": true, "-num_gpus": true, "-device": true,
	"--npz": false, "--c": false, "--val": false, "--val_best": false,
	"--disable_checkpointing": false, "--use_compressed": false,
}

// optionOrder is the order in which Argv appends options that were not on
// the original command line.
var optionOrder = []string{"-tr", "-p", "-pretrained_weights", "-num_gpus", "-device",
	"--npz", "--c", "--val", "--val_best", "--disable_checkpointing", "--use_compressed"}

var negativeNumberRE = regexp.MustCompile(`^-\d+$|^-\d*\.\d+$`)

// isOption reports whether argparse would treat a as an option string.
func isOption(a string) bool {
	return len(a) > 1 && a[0] == '-' && !negativeNumberRE.MatchString(a)
}

// ParseTrainArgs parses nnUNetv2_train's arguments (without the program
// name): the positional dataset, configuration and fold, and every
// nnUNetv2_train option, as "-opt value" or "-opt=value". Arguments it does
// not know go to Rest, in order. Errors (missing positionals, bad fold, a
// missing option value, an abbreviated option such as --disable or -pX,
// combinations nnU-Net rejects: --c with --val or -pretrained_weights,
// --val_best with --disable_checkpointing) wrap ErrConfig.
func ParseTrainArgs(args []string) (TrainArgs, error) {
	a := TrainArgs{Trainer: DefaultTrainer, Plans: DefaultPlans, NumGPUs: DefaultNumGPUs, Device: DefaultDevice}
	npos := 0
	afterDD := false
	for i := 0; i < len(args); i++ {
		s := args[i]
		if !afterDD && s == "--" {
			afterDD = true
			a.toks = append(a.toks, argTok{kind: tokDoubleDash})
			continue
		}
		if afterDD || !isOption(s) {
			if npos < 3 {
				*a.positional(npos) = s
				a.toks = append(a.toks, argTok{kind: tokPositional, index: npos})
				npos++
			} else {
				a.toks = append(a.toks, argTok{kind: tokRest, index: len(a.Rest)})
				a.Rest = append(a.Rest, s)
			}
			continue
		}
		name, value, equals := strings.Cut(s, "=")
		takesValue, known := knownOptions[name]
		if !known {
			if err := checkAbbreviation(s, name); err != nil {
				return TrainArgs{}, err
			}
			a.toks = append(a.toks, argTok{kind: tokRest, index: len(a.Rest)})
			a.Rest = append(a.Rest, s)
			continue
		}
		if !takesValue {
			if equals {
				return TrainArgs{}, configErrorf("nnunet: %s takes no value: write %s alone", name, name)
			}
			*a.flag(name) = true
			a.toks = append(a.toks, argTok{kind: tokOption, name: name})
			continue
		}
		if !equals {
			if i+1 >= len(args) || isOption(args[i+1]) {
				return TrainArgs{}, configErrorf("nnunet: %s needs a value: write %s <value>", name, name)
			}
			i++
			value = args[i]
		}
		if value == "" {
			return TrainArgs{}, configErrorf("nnunet: %s needs a non-empty value: write %s <value>", name, name)
		}
		if err := a.setValue(name, value); err != nil {
			return TrainArgs{}, err
		}
		a.toks = append(a.toks, argTok{kind: tokOption, name: name, equals: equals, value: value})
	}
	if npos < 3 {
		return TrainArgs{}, configErrorf("nnunet: nnUNetv2_train needs three arguments DATASET CONFIGURATION FOLD (e.g. 4 3d_fullres 0), got %d", npos)
	}
	if err := ValidFold(a.Fold); err != nil {
		return TrainArgs{}, err
	}
	switch {
	case a.Continue && a.ValOnly:
		return TrainArgs{}, configErrorf("nnunet: --c and --val cannot be used together (nnU-Net refuses): drop one")
	case a.Continue && a.PretrainedWeights != "":
		return TrainArgs{}, configErrorf("nnunet: --c and -pretrained_weights cannot be used together (nnU-Net refuses): drop -pretrained_weights")
	case a.ValBest && a.DisableCheckpointing:
		return TrainArgs{}, configErrorf("nnunet: --val_best and --disable_checkpointing cannot be used together (nnU-Net refuses): drop one")
	}
	return a, nil
}

// checkAbbreviation rejects option spellings that argparse would map to a
// known option but nnguard does not parse: prefixes (--disable, -pre,
// -dev) and -p with an attached value (-pMyPlans).
func checkAbbreviation(s, name string) error {
	var matches []string
	for _, k := range optionOrder {
		if strings.HasPrefix(k, name) {
			matches = append(matches, k)
		}
	}
	if len(matches) == 1 {
		return configErrorf("nnunet: %q looks like an abbreviation of %s: write the full option name", s, matches[0])
	}
	if len(matches) > 1 {
		return configErrorf("nnunet: %q is ambiguous (%s): write the full option name", s, strings.Join(matches, ", "))
	}
	if strings.HasPrefix(s, "-p") && !strings.HasPrefix(s, "--") {
		return configErrorf("nnunet: %q: write -p <plans identifier> with a space or -p=<plans identifier>", s)
	}
	return nil
}

func (a *TrainArgs) positional(i int) *string {
	switch i {
	case 0:
		return &a.Dataset
	case 1:
		return &a.Configuration
	default:
		return &a.Fold
	}
}

func (a *TrainArgs) flag(name string) *bool {
	switch name {
	case "--npz":
		return &a.NPZ
	case "--c":
		return &a.Continue
	case "--val":
		return &a.ValOnly
	case "--val_best":
		return &a.ValBest
	case "--disable_checkpointing":
		return &a.DisableCheckpointing
	case "--use_compressed":
		return &a.UseCompressed
	}
	panic("nnunet: unknown flag " + name)
}

func (a *TrainArgs) setValue(name, value string) error {
	switch name {
	case "-tr":
		a.Trainer = value
	case "-p":
		a.Plans = value
	case "-pretrained_weights":
		a.PretrainedWeights = value
	case "-device":
		switch value {
		case "cpu", "cuda", "mps":
		default:
			return configErrorf("nnunet: -device %q is not supported: use cpu, cuda or mps (pick the GPU with CUDA_VISIBLE_DEVICES)", value)
		}
		a.Device = value
	case "-num_gpus":
		n, ok := pyInt(value)
		if !ok || !n.IsInt64() || n.Int64() < 0 || n.Int64() > 1<<20 {
			return configErrorf("nnunet: -num_gpus %q is not a number of GPUs: write e.g. -num_gpus 2", value)
		}
		a.NumGPUs = int(n.Int64())
	}
	return nil
}

// valueOf is the current value of a valued option, and whether it should be
// on the command line at all.
func (a TrainArgs) valueOf(name string, o ArgvOptions) (string, bool) {
	switch name {
	case "-tr":
		return a.Trainer, a.Trainer != ""
	case "-p":
		if o.Plans != "" {
			return o.Plans, true
		}
		return a.Plans, a.Plans != ""
	case "-pretrained_weights":
		return a.PretrainedWeights, a.PretrainedWeights != "" && !o.DropPretrained
	case "-num_gpus":
		return strconv.Itoa(a.NumGPUs), true
	case "-device":
		return a.Device, a.Device != ""
	}
	return "", false
}

// flagOn is whether a flag should be on the rebuilt command line.
func (a TrainArgs) flagOn(name string, o ArgvOptions) bool {
	val := a.ValOnly || o.ValOnly
	switch name {
	case "--c":
		// the caller decides: it drops the user's --c when no checkpoint
		// exists (nnU-Net 2.0/2.1 crash on --c without one)
		return o.Continue && !val
	case "--val":
		return val
	}
	return *a.flag(name)
}

// isDefault reports whether an option absent from the original command line
// may stay absent because its value is nnU-Net's default.
func (a TrainArgs) isDefault(name string, o ArgvOptions) bool {
	if !knownOptions[name] {
		return !a.flagOn(name, o)
	}
	v, on := a.valueOf(name, o)
	if !on {
		return true
	}
	switch name {
	case "-tr":
		return v == DefaultTrainer
	case "-p":
		return v == DefaultPlans
	case "-num_gpus":
		return a.NumGPUs == 0 || a.NumGPUs == DefaultNumGPUs
	case "-device":
		return v == DefaultDevice
	}
	return false
}

// ArgvOptions are the changes Argv makes to a command line.
type ArgvOptions struct {
	Plans          string // when non-empty, the -p identifier to use instead
	Continue       bool   // add --c (never together with --val)
	DropPretrained bool   // remove -pretrained_weights (nnU-Net refuses it with --c)
	ValOnly        bool   // run only the validation: add --val, drop --c; --npz etc. stay
}

// Argv rebuilds the argument list (without the program name) with the
// changes in o. Everything else stays as the user gave it and in order:
// options keep their place and their spelling (-p X or -p=X); options that
// were not given are added after the user's arguments (before a "--") and
// only when their value differs from nnU-Net's default. A repeated option
// appears once, where the user gave it last (argparse's last-one-wins).
// --val wins over --c, because nnU-Net refuses the two together.
func (a TrainArgs) Argv(o ArgvOptions) []string {
	last := map[string]int{}
	for i, t := range a.toks {
		if t.kind == tokOption {
			last[t.name] = i
		}
	}
	var out []string
	ddAt := -1 // index in out where "--" was written
	seenPos := map[int]bool{}
	usedRest := map[int]bool{}
	for i, t := range a.toks {
		switch t.kind {
		case tokPositional:
			out = append(out, *a.positional(t.index))
			seenPos[t.index] = true
		case tokRest:
			if t.index < len(a.Rest) {
				out = append(out, a.Rest[t.index])
				usedRest[t.index] = true
			}
		case tokDoubleDash:
			ddAt = len(out)
			out = append(out, "--")
		case tokOption:
			if last[t.name] != i {
				continue
			}
			if !knownOptions[t.name] {
				if a.flagOn(t.name, o) {
					out = append(out, t.name)
				}
				continue
			}
			v, on := a.valueOf(t.name, o)
			if t.name == "-num_gpus" && a.NumGPUs == numGPUsOf(t.value) {
				v = t.value // keep the user's spelling
			}
			switch {
			case !on:
			case t.equals:
				out = append(out, t.name+"="+v)
			default:
				out = append(out, t.name, v)
			}
		}
	}
	// Positionals first when they were not parsed (hand-built TrainArgs).
	var head []string
	for i := 0; i < 3; i++ {
		if !seenPos[i] && *a.positional(i) != "" {
			head = append(head, *a.positional(i))
		}
	}
	var tail []string
	for _, name := range optionOrder {
		if _, given := last[name]; given || a.isDefault(name, o) {
			continue
		}
		if !knownOptions[name] {
			tail = append(tail, name)
			continue
		}
		v, _ := a.valueOf(name, o)
		tail = append(tail, name, v)
	}
	for i, r := range a.Rest {
		if !usedRest[i] {
			tail = append(tail, r)
		}
	}
	if ddAt >= 0 {
		tail = append(tail, out[ddAt:]...)
		out = out[:ddAt]
	}
	res := make([]string, 0, len(head)+len(out)+len(tail))
	res = append(res, head...)
	res = append(res, out...)
	return append(res, tail...)
}

func numGPUsOf(s string) int {
	n, ok := pyInt(s)
	if !ok || !n.IsInt64() {
		return -1
	}
	return int(n.Int64())
}
