package main

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/convsplit/convsplit/internal/testutil"
)

func TestAutoMixedMatchesAMCT(t *testing.T) {
	model := testutil.Fixture(t, "mixed")
	in := hashInputs(t, model)
	dir := t.TempDir()
	out := filepath.Join(dir, "mixed_auto.pt")
	infoOut := filepath.Join(dir, "decompose_info.json")

	code, stdout, stderr := runCommand("auto", "-model", model, "-o", out, "-info-out", infoOut)
	require.Equal(t, 0, code, "stderr: %s", stderr)
	in.assertUnchanged(t)

	want, err := os.ReadFile(testutil.AMCT("mixed", "decompose_info.json"))
	require.NoError(t, err)
	got, err := os.ReadFile(infoOut)
	require.NoError(t, err)
	assert.Equal(t, string(want), string(got), "information file")

	assert.Regexp(t, regexp.MustCompile(`(?m)^LAYER\s+NEW LAYERS\ndown\s+down\.0, down\.1\n`), stdout)
	assert.Contains(t, stdout, "6 layers replaced\n")
	assert.Regexp(t, `(?m)^parameters: \d+ before, \d+ after \(\d+\.\d%\)$`, stdout)
	assert.Contains(t, stdout, "wrote "+out+"\n")
	assert.Contains(t, stdout, "wrote "+infoOut+"\n")
	assert.Contains(t, moduleNames(t, out), "tail.0.1.1")

	// stderr is not a terminal here: warnings only, no progress bar.
	assert.NotContains(t, stderr, "layers, ")
	assert.NotContains(t, stderr, "\r")
	assert.Equal(t, 6, strings.Count(stderr, "level=WARN msg=\"rank estimate is 0"), "stderr: %s", stderr)
}

func TestAutoVerboseLogsLayers(t *testing.T) {
	model := testutil.Fixture(t, "mixed")
	dir := t.TempDir()

	code, _, stderr := runCommand("auto", "-v", "-model", model, "-o", filepath.Join(dir, "out.pt"), "-info-out", filepath.Join(dir, "info.json"))
	require.Equal(t, 0, code, "stderr: %s", stderr)
	assert.Regexp(t, `level=DEBUG msg="decomposed layer" layer=tall mode=SCSK L=768 M=1280 estimate=0 rank=160 seconds=\d+(\.\d+)?\n`, stderr)
	assert.Equal(t, 6, strings.Count(stderr, `msg="decomposed layer"`))
	assert.Contains(t, stderr, `msg="layer left unchanged" layer=heads.b reason="groups is 2 (only 1 is decomposed)"`)
}

func TestAutoUsageErrors(t *testing.T) {
	dir := t.TempDir()
	model := testutil.CopyFile(t, testutil.Fixture(t, "root_conv"))
	link := filepath.Join(dir, "link.pt")
	require.NoError(t, os.Symlink(model, link))
	out := filepath.Join(dir, "out.pt")
	info := filepath.Join(dir, "info.json")
	in := hashInputs(t, model)

	tests := []struct {
		name string
		args []string
		// want is a part of the message on stderr.
		want string
	}{
		{"no flags", nil, "-model is required"},
		{"missing -model", []string{"-o", out, "-info-out", info}, "-model is required"},
		{"missing -o", []string{"-model", model, "-info-out", info}, "-o is required"},
		{"missing -info-out", []string{"-model", model, "-o", out}, "-info-out is required"},
		{"extra argument", []string{"-model", model, "-o", out, "-info-out", info, "extra"}, `unexpected argument "extra"`},
		{"unknown flag", []string{"-model", model, "-o", out, "-info-out", info, "-seed", "1"}, "flag provided but not defined: -seed"},
		{"output is the model", []string{"-model", model, "-o", model, "-info-out", info}, "-o " + model + " would overwrite the input model"},
		{"output is a link to the model", []string{"-model", model, "-o", link, "-info-out", info}, "would overwrite the input model"},
		{"info is the model", []string{"-model", model, "-o", out, "-info-out", model}, "-info-out " + model + " would overwrite the input model"},
		{"info is the output", []string{"-model", model, "-o", out, "-info-out", out}, "-o and -info-out name the same file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, stdout, stderr := runCommand(append([]string{"auto"}, tt.args...)...)
			assert.Equal(t, 2, code)
			assert.Contains(t, stderr, tt.want)
			assert.Empty(t, stdout)
			assertMissing(t, out)
			assertMissing(t, info)
			in.assertUnchanged(t)
		})
	}
}

func TestAutoHelp(t *testing.T) {
	code, stdout, stderr := runCommand("auto", "-h")
	assert.Equal(t, 0, code)
	assert.Empty(t, stdout)
	assert.Contains(t, stderr, "usage: convsplit auto -model IN.pt -o OUT.pt -info-out INFO.json [-v]")
	assert.Contains(t, stderr, "-info-out file")
}

func TestAutoJobErrors(t *testing.T) {
	dir := t.TempDir()
	model := testutil.Fixture(t, "root_conv")
	notModel := filepath.Join(dir, "not_a_model.pt")
	require.NoError(t, os.WriteFile(notModel, []byte("not a TorchScript archive\n"), 0o644))
	outDir := filepath.Join(dir, "out")
	require.NoError(t, os.Mkdir(outDir, 0o755))
	out := filepath.Join(outDir, "out.pt")
	info := filepath.Join(outDir, "info.json")
	in := hashInputs(t, model, notModel)

	tests := []struct {
		name string
		args []string
		// want lists parts of the last line of stderr, the error message.
		want []string
	}{
		{"missing model", []string{"-model", filepath.Join(dir, "missing.pt"), "-o", out, "-info-out", info}, []string{"missing.pt"}},
		{"not a TorchScript file", []string{"-model", notModel, "-o", out, "-info-out", info}, []string{"load"}},
		{"output is a folder", []string{"-model", model, "-o", outDir, "-info-out", info}, []string{outDir}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, stdout, stderr := runCommand(append([]string{"auto"}, tt.args...)...)
			assert.Equal(t, 1, code)
			lines := strings.Split(strings.TrimSuffix(stderr, "\n"), "\n")
			message := lines[len(lines)-1]
			assert.True(t, strings.HasPrefix(message, "convsplit auto: "), "stderr: %q", stderr)
			for _, part := range tt.want {
				assert.Contains(t, message, part)
			}
			assert.NotContains(t, stderr, "Exception raised from")
			assert.NotContains(t, stdout, "wrote")
			assertEmptyDir(t, outDir)
			in.assertUnchanged(t)
		})
	}
}

func TestProgressBarKeepsLogsAbove(t *testing.T) {
	var screen bytes.Buffer
	bar := &progressBar{w: &screen}
	_, err := bar.Write([]byte("before the bar\n"))
	require.NoError(t, err)
	bar.update(1, 4, "conv1")
	_, err = bar.Write([]byte("a log record\n"))
	require.NoError(t, err)
	bar.update(4, 4, "layer4.1.conv2")
	bar.finish()
	bar.finish()

	want := "before the bar\n" +
		"\r\x1b[K[#######-----------------------] 1/4 layers, 0.0s, conv1" +
		"\r\x1b[Ka log record\n[#######-----------------------] 1/4 layers, 0.0s, conv1" +
		"\r\x1b[K[##############################] 4/4 layers, 0.0s, layer4.1.conv2\n"
	// The elapsed time depends on the clock, so it is normalized first.
	got := regexp.MustCompile(`\d+\.\ds,`).ReplaceAllString(screen.String(), "0.0s,")
	assert.Equal(t, want, got)
}

func TestIsTerminal(t *testing.T) {
	file, err := os.Create(filepath.Join(t.TempDir(), "log.txt"))
	require.NoError(t, err)
	defer file.Close()

	assert.False(t, isTerminal(&bytes.Buffer{}), "buffer")
	assert.False(t, isTerminal(file), "regular file")
}
