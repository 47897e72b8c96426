package nnunet

// Training is what one nnUNetv2_train command line refers to on disk.
type Training struct {
	DatasetDir string // <nnUNet_preprocessed>/<DatasetXXX_Name>
	Plans      *Plans // the plans file -p names
	FoldDir    string // where nnU-Net writes this fold (FoldDir)
}

// Locate finds the dataset, loads the plans file named by a.Plans (the
// default nnUNetPlans when empty), checks that a.Configuration exists in it
// and a.Fold is valid, and computes the fold folder from the plans'
// internal dataset_name and plans_name, as nnU-Net does. Errors wrap
// ErrConfig.
func Locate(env Env, a TrainArgs) (Training, error) {
	if err := ValidFold(a.Fold); err != nil {
		return Training{}, err
	}
	ds, err := FindDataset(env.Preprocessed, a.Dataset)
	if err != nil {
		return Training{}, err
	}
	id := a.Plans
	if id == "" {
		id = DefaultPlans
	}
	p, err := LoadPlans(PlansPath(ds, id))
	if err != nil {
		return Training{}, err
	}
	if _, err := p.Configuration(a.Configuration); err != nil {
		return Training{}, err
	}
	trainer := a.Trainer
	if trainer == "" {
		trainer = DefaultTrainer
	}
	return Training{
		DatasetDir: ds,
		Plans:      p,
		FoldDir:    FoldDir(env, p.DatasetName, trainer, p.Name, a.Configuration, a.Fold),
	}, nil
}
