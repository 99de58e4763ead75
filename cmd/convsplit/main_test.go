package main

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/convsplit/convsplit/internal/testutil"
)

func TestRunHelp(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want []string
	}{
		{"help", []string{"help"}, []string{"usage: convsplit COMMAND", "apply"}},
		{"-h", []string{"-h"}, []string{"usage: convsplit COMMAND", "apply"}},
		{"--help", []string{"--help"}, []string{"usage: convsplit COMMAND", "apply"}},
		{"apply -h", []string{"apply", "-h"}, []string{"usage: convsplit apply", "-model", "-info", "-o", "-changes", "-seed", "-dry-run", "-in-place"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, stdout, stderr := runCommand(tt.args...)
			assert.Equal(t, 0, code)
			assert.Empty(t, stdout)
			for _, part := range tt.want {
				assert.Contains(t, stderr, part)
			}
		})
	}
}

// buildBinary builds the convsplit command into a temporary folder.
func buildBinary(t *testing.T) string {
	t.Helper()
	goTool, err := exec.LookPath("go")
	if err != nil {
		goTool = filepath.Join(runtime.GOROOT(), "bin", "go")
	}
	bin := filepath.Join(t.TempDir(), "convsplit")
	out, err := exec.Command(goTool, "build", "-o", bin, ".").CombinedOutput()
	require.NoError(t, err, "go build: %s", out)
	return bin
}

func TestBinaryExitStatus(t *testing.T) {
	bin := buildBinary(t)
	model := testutil.Fixture(t, "root_conv")
	info := testutil.AMCT("root_conv", "decompose_info.json")
	mixedInfo := testutil.AMCT("mixed", "decompose_info.json")
	in := hashInputs(t, model, info, mixedInfo)
	dir := t.TempDir()
	out := filepath.Join(dir, "out.pt")

	tests := []struct {
		name   string
		args   []string
		status int
		// stdout and stderr list parts of the output.
		stdout, stderr []string
		// wrote is whether out exists afterwards.
		wrote bool
	}{
		{
			name: "success", args: []string{"apply", "-model", model, "-info", info, "-o", out, "-seed", "1"},
			status: 0, stdout: []string{"LAYER", `""`, "1 layer replaced", "wrote " + out}, wrote: true,
		},
		{
			name: "usage error", args: []string{"apply", "-model", model, "-o", out},
			status: 2, stderr: []string{"-info is required"},
		},
		{
			name: "output is the model", args: []string{"apply", "-model", model, "-info", info, "-o", model},
			status: 2, stderr: []string{"would overwrite the input"},
		},
		{
			name: "unknown layer", args: []string{"apply", "-model", model, "-info", mixedInfo, "-o", out},
			status: 1, stderr: []string{"convsplit apply: ", mixedInfo, "down"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			os.Remove(out)
			cmd := exec.Command(bin, tt.args...)
			var stdout, stderr bytes.Buffer
			cmd.Stdout, cmd.Stderr = &stdout, &stderr
			err := cmd.Run()

			status := 0
			var exitErr *exec.ExitError
			if errors.As(err, &exitErr) {
				status = exitErr.ExitCode()
			} else {
				require.NoError(t, err)
			}
			assert.Equal(t, tt.status, status, "stderr: %s", stderr.String())
			for _, part := range tt.stdout {
				assert.Contains(t, stdout.String(), part)
			}
			for _, part := range tt.stderr {
				assert.Contains(t, stderr.String(), part)
			}
			if tt.status == 1 {
				assert.Equal(t, 1, strings.Count(stderr.String(), "\n"), "stderr must be one line: %q", stderr.String())
			}
			_, statErr := os.Stat(out)
			assert.Equal(t, tt.wrote, statErr == nil, "whether %s exists", out)
			in.assertUnchanged(t)
		})
	}
}
