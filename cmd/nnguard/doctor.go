package main

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/google/shlex"
	"github.com/urfave/cli/v2"
	"go.uber.org/zap"

	"github.com/nnguard/nnguard/doctor"
	"github.com/nnguard/nnguard/nvml"
	"github.com/nnguard/nnguard/supervisor"
)

func doctorCommand(stdout io.Writer, logp **zap.Logger) *cli.Command {
	var asJSON bool
	var trainerCmd, simGPU string
	return &cli.Command{
		Name:  "doctor",
		Usage: "check the GPU, the nnU-Net environment and versions before a long job",
		Description: `Reports the GPUs (or why NVML is off), their free memory and foreign processes, driver
and CUDA versions, the nnUNet_* variables and their folders, the trainer command and,
through its Python, the nnunetv2 / torch / batchgenerators versions with known-bad
combinations, /dev/shm against the worker count, host RAM and free disk.
Exit 0 when fine, 1 with a list of problems.`,
		Flags: []cli.Flag{
			&cli.BoolFlag{Name: "json", Usage: "print the report as JSON", Destination: &asJSON},
			&cli.StringFlag{Name: "trainer-cmd", Value: "nnUNetv2_train", EnvVars: []string{"NNGUARD_TRAINER_CMD"}, Usage: "trainer command to check", Destination: &trainerCmd},
			&cli.StringFlag{Name: "sim-gpu", Hidden: true, EnvVars: []string{"NNGUARD_SIM_GPU_STATE"}, Destination: &simGPU},
		},
		Action: func(c *cli.Context) error {
			argv, err := shlex.Split(trainerCmd)
			if err != nil || len(argv) == 0 {
				return exitWith(supervisor.ExitUsage, fmt.Errorf("bad --trainer-cmd %q", trainerCmd))
			}
			opts := doctor.Options{TrainerCmd: argv, Getenv: os.Getenv}
			if simGPU != "" {
				opts.GPU = nvml.NewSimFile(simGPU)
			} else if nv, err := nvml.NewSystem(); err != nil {
				opts.GPUErr = err
			} else {
				defer nv.Close()
				opts.GPU = nv
			}
			rep := doctor.Run(c.Context, opts)
			if asJSON {
				b, _ := jsonMarshal(rep)
				fmt.Fprintln(stdout, string(b))
			} else {
				fmt.Fprint(stdout, rep.Text())
			}
			if !rep.OK() {
				return exitWith(1, errors.New(""))
			}
			return nil
		},
	}
}
