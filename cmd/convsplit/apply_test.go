package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/convsplit/convsplit/internal/testutil"
	"github.com/convsplit/convsplit/torch"
)

// Tests here run the command in-process. They seed libtorch's global
// generator, so none of them runs in parallel.

// runCommand runs the command line in-process and returns its exit status
// and output.
func runCommand(args ...string) (code int, stdout, stderr string) {
	var out, errOut bytes.Buffer
	code = run(args, &out, &errOut)
	return code, out.String(), errOut.String()
}

func fileHash(t *testing.T, path string) string {
	t.Helper()
	data, err := os.ReadFile(path)
	require.NoError(t, err)
	sum := sha256.Sum256(data)
	return hex.EncodeToString(sum[:])
}

// inputs records the hashes of input files, to check later that a command
// left them as they were.
type inputs map[string]string

func hashInputs(t *testing.T, paths ...string) inputs {
	t.Helper()
	hashes := inputs{}
	for _, path := range paths {
		hashes[path] = fileHash(t, path)
	}
	return hashes
}

func (in inputs) assertUnchanged(t *testing.T) {
	t.Helper()
	for path, hash := range in {
		assert.Equal(t, hash, fileHash(t, path), "input %s changed", path)
	}
}

func assertMissing(t *testing.T, path string) {
	t.Helper()
	_, err := os.Stat(path)
	assert.True(t, os.IsNotExist(err), "%s must not exist, stat gives %v", path, err)
}

// assertEmptyDir checks that a command left no file, temporary ones
// included, in dir.
func assertEmptyDir(t *testing.T, dir string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	assert.Empty(t, names, "files left in %s", dir)
}

// orderedKeys returns the keys of a JSON object in file order and its values.
func orderedKeys(t *testing.T, data []byte) ([]string, map[string][]string) {
	t.Helper()
	dec := json.NewDecoder(bytes.NewReader(data))
	token, err := dec.Token()
	require.NoError(t, err)
	require.Equal(t, json.Delim('{'), token)
	var keys []string
	values := map[string][]string{}
	for dec.More() {
		token, err := dec.Token()
		require.NoError(t, err)
		key := token.(string)
		var names []string
		require.NoError(t, dec.Decode(&names))
		keys = append(keys, key)
		values[key] = names
	}
	return keys, values
}

func moduleNames(t *testing.T, path string) []string {
	t.Helper()
	m, err := torch.Load(path)
	require.NoError(t, err)
	defer m.Close()
	modules, err := m.NamedModules()
	require.NoError(t, err)
	names := make([]string, len(modules))
	for i, info := range modules {
		names[i] = info.Name
	}
	return names
}

func TestApplyMixedMatchesAMCT(t *testing.T) {
	model := testutil.Fixture(t, "mixed")
	info := testutil.AMCT("mixed", "decompose_info.json")
	in := hashInputs(t, model, info)
	dir := t.TempDir()
	out := filepath.Join(dir, "mixed_decomposed.pt")
	changes := filepath.Join(dir, "changes.json")

	code, stdout, stderr := runCommand("apply", "-model", model, "-info", info, "-o", out, "-changes", changes, "-seed", "1234")
	require.Equal(t, 0, code, "stderr: %s", stderr)
	assert.Empty(t, stderr)
	in.assertUnchanged(t)

	rows := []string{
		`down\s+down\.0, down\.1`,
		`tall\s+tall\.0, tall\.1`,
		`squeeze\s+squeeze\.0, squeeze\.1`,
		`blocks\.0\s+blocks\.0\.0, blocks\.0\.1`,
		`blocks\.1\s+blocks\.1\.0, blocks\.1\.1`,
		`tail\.0\.1\s+tail\.0\.1\.0, tail\.0\.1\.1`,
	}
	table := `(?m)^LAYER\s+NEW LAYERS\n` + strings.Join(rows, `\n`) + `\n6 layers replaced\n`
	assert.Regexp(t, regexp.MustCompile(table), stdout)
	assert.Regexp(t, `(?m)^parameters: \d+ before, \d+ after \(\d+\.\d%\)$`, stdout)
	assert.Contains(t, stdout, "wrote "+out+"\n")
	assert.Contains(t, stdout, "wrote "+changes+"\n")

	data, err := os.ReadFile(changes)
	require.NoError(t, err)
	keys, values := orderedKeys(t, data)
	assert.Equal(t, []string{"down", "tall", "squeeze", "blocks.0", "blocks.1", "tail.0.1"}, keys)
	assert.Equal(t, []string{"blocks.0.0", "blocks.0.1"}, values["blocks.0"])

	report := testutil.RunPython(t, "check_reference.py",
		"--reference", testutil.AMCT("mixed", "reference.json"), "--model", out, "--changes", changes,
		"--original", model,
		"--io", testutil.AMCT("mixed", "io.pt"), "--state", testutil.AMCT("mixed", "decomposed_state.pt"))
	assert.Contains(t, report, "checks passed")
}

func TestApplyRootConvTable(t *testing.T) {
	model := testutil.Fixture(t, "root_conv")
	info := testutil.AMCT("root_conv", "decompose_info.json")
	out := filepath.Join(t.TempDir(), "out.pt")

	code, stdout, stderr := runCommand("apply", "-model", model, "-info", info, "-o", out)
	require.Equal(t, 0, code, "stderr: %s", stderr)
	assert.Regexp(t, `(?m)^LAYER\s+NEW LAYERS\n""\s+0, 1\n`, stdout)
	// Conv2d(64, 128, 3) has 73856 parameters; rank 32 gives 6144 + 12288 + 128.
	assert.Contains(t, stdout, "parameters: 73856 before, 18560 after (25.1%)\n")
	assert.Equal(t, []string{"", "0", "1"}, moduleNames(t, out))
}

func TestApplyDryRun(t *testing.T) {
	model := testutil.Fixture(t, "mixed")
	info := testutil.AMCT("mixed", "decompose_info.json")
	in := hashInputs(t, model, info)
	tests := []struct {
		name   string
		output bool
	}{
		{"with -o", true},
		{"without -o", false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			args := []string{"apply", "-dry-run", "-model", model, "-info", info, "-changes", filepath.Join(dir, "changes.json")}
			if tt.output {
				args = append(args, "-o", filepath.Join(dir, "out.pt"))
			}

			code, stdout, stderr := runCommand(args...)
			require.Equal(t, 0, code, "stderr: %s", stderr)
			assert.Contains(t, stdout, "6 layers replaced\n")
			assert.Contains(t, stdout, "dry run: nothing written\n")
			assert.NotContains(t, stdout, "wrote")
			assertMissing(t, filepath.Join(dir, "out.pt"))
			assertMissing(t, filepath.Join(dir, "changes.json"))
			assertEmptyDir(t, dir)
			in.assertUnchanged(t)
		})
	}
}

func TestApplyUsageErrors(t *testing.T) {
	dir := t.TempDir()
	model := testutil.CopyFile(t, testutil.Fixture(t, "root_conv"))
	info := testutil.CopyFile(t, testutil.AMCT("root_conv", "decompose_info.json"))
	link := filepath.Join(dir, "link.pt")
	require.NoError(t, os.Symlink(model, link))
	hardLink := filepath.Join(dir, "hard.pt")
	require.NoError(t, os.Link(model, hardLink))
	out := filepath.Join(dir, "out.pt")
	in := hashInputs(t, model, info)

	tests := []struct {
		name string
		args []string
		// want is a part of the message on stderr.
		want string
	}{
		{"no arguments", nil, "usage: convsplit COMMAND"},
		{"unknown command", []string{"frobnicate"}, `unknown command "frobnicate"`},
		{"no flags", []string{"apply"}, "-model is required"},
		{"missing -info", []string{"apply", "-model", model, "-o", out}, "-info is required"},
		{"missing -model", []string{"apply", "-info", info, "-o", out}, "-model is required"},
		{"missing -o", []string{"apply", "-model", model, "-info", info}, "-o is required"},
		{"extra argument", []string{"apply", "-model", model, "-info", info, "-o", out, "extra"}, `unexpected argument "extra"`},
		{"seed not a number", []string{"apply", "-model", model, "-info", info, "-o", out, "-seed", "abc"}, `invalid value "abc" for flag -seed`},
		{"negative seed", []string{"apply", "-model", model, "-info", info, "-o", out, "-seed", "-1"}, "-seed must be non-negative"},
		{"unknown flag", []string{"apply", "-model", model, "-info", info, "-o", out, "-fast"}, "flag provided but not defined: -fast"},
		{"output is the model", []string{"apply", "-model", model, "-info", info, "-o", model}, "would overwrite the input " + model},
		{"output is the model spelled otherwise", []string{"apply", "-model", model, "-info", info, "-o", filepath.Join(filepath.Dir(model), ".", "x", "..", filepath.Base(model))}, "would overwrite the input"},
		{"output is a link to the model", []string{"apply", "-model", model, "-info", info, "-o", link}, "would overwrite the input"},
		{"output is a hard link to the model", []string{"apply", "-model", model, "-info", info, "-o", hardLink}, "would overwrite the input"},
		{"output is the info file", []string{"apply", "-model", model, "-info", info, "-o", info}, "would overwrite the input " + info},
		{"output is the info file in place", []string{"apply", "-in-place", "-model", model, "-info", info, "-o", info}, "would overwrite the input " + info},
		{"changes is the model", []string{"apply", "-model", model, "-info", info, "-o", out, "-changes", model}, "-changes"},
		{"changes is the info file", []string{"apply", "-model", model, "-info", info, "-o", out, "-changes", info}, "-changes"},
		{"changes is the output", []string{"apply", "-model", model, "-info", info, "-o", out, "-changes", out}, "-changes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, stdout, stderr := runCommand(tt.args...)
			assert.Equal(t, 2, code)
			assert.Contains(t, stderr, tt.want)
			assert.Empty(t, stdout)
			assertMissing(t, out)
			in.assertUnchanged(t)
		})
	}
}

func TestApplyJobErrors(t *testing.T) {
	dir := t.TempDir()
	model := testutil.Fixture(t, "root_conv")
	info := testutil.AMCT("root_conv", "decompose_info.json")
	mixedInfo := testutil.AMCT("mixed", "decompose_info.json")
	badJSON := filepath.Join(dir, "bad.json")
	require.NoError(t, os.WriteFile(badJSON, []byte(`[{"ori_layer_info": `), 0o644))
	notModel := filepath.Join(dir, "not_a_model.pt")
	require.NoError(t, os.WriteFile(notModel, []byte("not a TorchScript archive\n"), 0o644))
	outDir := filepath.Join(dir, "out")
	require.NoError(t, os.Mkdir(outDir, 0o755))
	out := filepath.Join(outDir, "out.pt")
	in := hashInputs(t, model, info, mixedInfo, badJSON, notModel)

	tests := []struct {
		name string
		args []string
		// want lists parts of the one-line message on stderr.
		want []string
	}{
		{"missing model", []string{"-model", filepath.Join(dir, "missing.pt"), "-info", info, "-o", out}, []string{"missing.pt"}},
		{"not a TorchScript file", []string{"-model", notModel, "-info", info, "-o", out}, []string{"load"}},
		{"missing info file", []string{"-model", model, "-info", filepath.Join(dir, "missing.json"), "-o", out}, []string{"missing.json"}},
		{"info file is a folder", []string{"-model", model, "-info", dir, "-o", out}, []string{dir, "directory"}},
		{"invalid JSON", []string{"-model", model, "-info", badJSON, "-o", out}, []string{badJSON, "invalid JSON"}},
		{"unknown layer", []string{"-model", model, "-info", mixedInfo, "-o", out}, []string{mixedInfo, "down", "ori_layer_info.name"}},
		{"output is a folder", []string{"-model", model, "-info", info, "-o", outDir}, []string{outDir}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, stdout, stderr := runCommand(append([]string{"apply"}, tt.args...)...)
			assert.Equal(t, 1, code)
			assert.True(t, strings.HasPrefix(stderr, "convsplit apply: "), "stderr: %q", stderr)
			assert.Equal(t, 1, strings.Count(stderr, "\n"), "stderr must be one line: %q", stderr)
			for _, part := range tt.want {
				assert.Contains(t, stderr, part)
			}
			assert.NotContains(t, stderr, "Exception raised from")
			assert.NotContains(t, stdout, "wrote")
			assertMissing(t, out)
			assertEmptyDir(t, outDir)
			in.assertUnchanged(t)
		})
	}
}

func TestApplyInPlace(t *testing.T) {
	model := testutil.CopyFile(t, testutil.Fixture(t, "root_conv"))
	info := testutil.AMCT("root_conv", "decompose_info.json")
	in := hashInputs(t, info)
	before := fileHash(t, model)

	code, stdout, stderr := runCommand("apply", "-in-place", "-model", model, "-info", info, "-o", model)
	require.Equal(t, 0, code, "stderr: %s", stderr)
	assert.Contains(t, stdout, "wrote "+model+"\n")
	assert.NotEqual(t, before, fileHash(t, model), "the model file must hold the new model")
	assert.Equal(t, []string{"", "0", "1"}, moduleNames(t, model))
	in.assertUnchanged(t)

	entries, err := os.ReadDir(filepath.Dir(model))
	require.NoError(t, err)
	require.Len(t, entries, 1, "temporary files left beside the model")
	assert.Equal(t, filepath.Base(model), entries[0].Name())
}

func TestApplySeedReproducible(t *testing.T) {
	model := testutil.Fixture(t, "shared_weight")
	info := testutil.AMCT("shared_weight", "decompose_info.json")
	dir := t.TempDir()
	runSeed := func(name, seed string) string {
		out := filepath.Join(dir, name)
		code, _, stderr := runCommand("apply", "-model", model, "-info", info, "-o", out, "-seed", seed)
		require.Equal(t, 0, code, "stderr: %s", stderr)
		return parameterHash(t, out, "c1.0.weight")
	}
	first := runSeed("a.pt", "42")
	assert.Equal(t, first, runSeed("b.pt", "42"), "the same -seed must give the same weights")
	assert.NotEqual(t, first, runSeed("c.pt", "43"), "another -seed must give other weights")
}

// parameterHash returns the SHA-256 of a parameter of the model saved at path.
func parameterHash(t *testing.T, path, key string) string {
	t.Helper()
	m, err := torch.Load(path)
	require.NoError(t, err)
	defer m.Close()
	i := strings.LastIndexByte(key, '.')
	sub, err := m.Submodule(key[:i])
	require.NoError(t, err)
	defer sub.Close()
	p, err := sub.Parameter(key[i+1:])
	require.NoError(t, err)
	defer p.Close()
	data, err := p.Bytes()
	require.NoError(t, err)
	sum := sha256.Sum256(data)
	return hex.EncodeToString(sum[:])
}
