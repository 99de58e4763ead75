// Package examples_test builds the example programs and runs them from the
// repository root, as a user would.
package examples_test

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/convsplit/convsplit/internal/testutil"
	"github.com/convsplit/convsplit/torch"
)

// goCommand returns the go tool that runs this test.
func goCommand() string {
	if path, err := exec.LookPath("go"); err == nil {
		return path
	}
	return filepath.Join(runtime.GOROOT(), "bin", "go")
}

// buildExamples compiles both examples into a temporary folder, in one go
// build so that they link in parallel.
func buildExamples(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	cmd := exec.Command(goCommand(), "build", "-o", dir+string(filepath.Separator), "./examples/finetune", "./examples/rewrite")
	cmd.Dir = testutil.Root()
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "go build: %s", out)
	return dir
}

// runExample runs a built example from the repository root and returns its
// exit status, standard output and standard error.
func runExample(t *testing.T, binary string, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	cmd := exec.Command(binary, args...)
	cmd.Dir = testutil.Root()
	var out, errOut bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &errOut
	err := cmd.Run()
	if exitErr, ok := err.(*exec.ExitError); ok {
		return exitErr.ExitCode(), out.String(), errOut.String()
	}
	require.NoError(t, err)
	return 0, out.String(), errOut.String()
}

var lossLine = regexp.MustCompile(`(?m)^step (\d+): loss (\S+)$`)

func TestExamples(t *testing.T) {
	bin := buildExamples(t)
	fixture := testutil.Fixture(t, "mixed")

	t.Run("finetune", func(t *testing.T) {
		dir := t.TempDir()
		modelPath := filepath.Join(dir, "model.pt")
		statePath := filepath.Join(dir, "state.pt")
		code, stdout, stderr := runExample(t, filepath.Join(bin, "finetune"), "-model", fixture, "-o", modelPath, "-state", statePath)
		require.Equal(t, 0, code, stderr)
		t.Log(stdout)

		matches := lossLine.FindAllStringSubmatch(stdout, -1)
		require.Len(t, matches, 10, "one loss per step")
		losses := make([]float64, len(matches))
		for i, m := range matches {
			assert.Equal(t, strconv.Itoa(i+1), m[1])
			value, err := strconv.ParseFloat(m[2], 64)
			require.NoError(t, err)
			losses[i] = value
		}
		for i := 1; i < len(losses); i++ {
			assert.Less(t, losses[i], losses[i-1], "step %d lowers the loss", i+1)
		}
		assert.Contains(t, stdout, "loaded 23 tensors")

		// The TorchScript file and the state dict hold the same weights, and
		// Python's load_state_dict reads the state dict.
		saved, err := torch.Load(modelPath)
		require.NoError(t, err)
		defer saved.Close()
		fromModel, err := torch.StateDictOf(saved)
		require.NoError(t, err)
		defer fromModel.Close()
		fromFile, err := torch.LoadStateDictFile(statePath)
		require.NoError(t, err)
		defer fromFile.Close()
		require.Equal(t, fromModel.Keys(), fromFile.Keys())
		for _, key := range fromFile.Keys() {
			a, _ := fromModel.Get(key)
			b, _ := fromFile.Get(key)
			want, err := a.Bytes()
			require.NoError(t, err)
			got, err := b.Bytes()
			require.NoError(t, err)
			assert.Equal(t, want, got, key)
		}
		report := testutil.RunPython(t, "finetune_check.py", "mixed", "--state", statePath)
		assert.Contains(t, report, "ok   mixed")
	})

	t.Run("finetune wrong weights", func(t *testing.T) {
		dir := t.TempDir()
		modelPath := filepath.Join(dir, "model.pt")
		code, _, stderr := runExample(t, filepath.Join(bin, "finetune"), "-model", fixture,
			"-weights", testutil.AMCT("lowrank", "decomposed_state.pt"), "-o", modelPath, "-state", filepath.Join(dir, "state.pt"))
		assert.Equal(t, 1, code)
		assert.Contains(t, stderr, "state dict does not match the module")
		_, err := os.Stat(modelPath)
		assert.ErrorIs(t, err, os.ErrNotExist)
	})

	t.Run("rewrite", func(t *testing.T) {
		dir := t.TempDir()
		out := filepath.Join(dir, "mixed.pt")
		changes := filepath.Join(dir, "changes.json")
		code, stdout, stderr := runExample(t, filepath.Join(bin, "rewrite"), "-model", fixture, "-o", out,
			"-changes", changes, "-seed", "1234")
		require.Equal(t, 0, code, stderr)
		assert.Contains(t, stdout, `"down" -> "down.0", "down.1"`)
		assert.Contains(t, stdout, "wrote "+out)

		testutil.RunPython(t, "check_reference.py", "--reference", testutil.AMCT("mixed", "reference.json"),
			"--model", out, "--changes", changes, "--original", fixture)
	})
}
