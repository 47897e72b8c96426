package nnunet

import (
	"errors"
	"fmt"
)

// ErrConfig is wrapped by every error that the user can fix before a launch:
// a missing environment variable, an unknown dataset, plans file or
// configuration, a malformed plans file, or a bad nnUNetv2_train argument.
// Check it with errors.Is.
var ErrConfig = errors.New("nnunet: configuration error")

// configError is a one-line message that wraps ErrConfig (and optionally a
// cause) without repeating ErrConfig's text.
type configError struct {
	msg   string
	cause error
}

func (e *configError) Error() string { return e.msg }

func (e *configError) Unwrap() []error {
	if e.cause == nil {
		return []error{ErrConfig}
	}
	return []error{ErrConfig, e.cause}
}

// configErrorf formats a message that must start with "nnunet: ".
func configErrorf(format string, args ...any) error {
	return &configError{msg: fmt.Sprintf(format, args...)}
}

// configWrap is configErrorf with a cause kept in the chain (not printed
// unless the format does so).
func configWrap(cause error, format string, args ...any) error {
	return &configError{msg: fmt.Sprintf(format, args...), cause: cause}
}
