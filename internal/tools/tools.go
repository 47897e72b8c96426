//go:build tools

package tools

import (
	_ "github.com/NVIDIA/go-nvml/pkg/nvml"
	_ "github.com/NVIDIA/go-nvml/pkg/nvml/mock"
	_ "github.com/creack/pty"
	_ "github.com/google/shlex"
	_ "github.com/nlpodyssey/gopickle/pickle"
	_ "github.com/urfave/cli/v2"
	_ "go.uber.org/zap"
)
