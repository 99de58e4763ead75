package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/convsplit/convsplit/internal/testutil"
)

// The battery runs the built convsplit binary on broken models, broken
// information files and wrong command lines. A C++ exception that escapes
// the shim aborts the whole process, so only a separate process shows it.
// For every case it checks the exit status: 1 when the job fails, 2 for
// usage errors. stderr must name the culprit and show no C++ backtrace or Go
// panic. No input file may change its content or modification time, and the
// command's working folder, output folder included, must end as it was, so
// no output and no temporary file is left.

// crashMarkers are texts that only a crash or a leaked backtrace writes to stderr.
var crashMarkers = []string{
	"Exception raised from", "frame #", "terminate called", "panic:", "goroutine ",
	"SIGABRT", "SIGSEGV", "fatal error:",
}

// downEntry is the entry of layer down of mixed's AMCT information file,
// written on one line. Cases edit it to break one field at a time.
const downEntry = `{"ori_layer_info": {"name": "down", "in_channels": 128, "out_channels": 256, ` +
	`"kernel_size": [3, 3], "stride": [2, 2], "dilation": [1, 1], "groups": 1}, "mode": "SCFK", ` +
	`"decom_nodes": {"first": {"weight_shape": [64, 128, 3, 1]}, "last": {"weight_shape": [256, 64, 1, 3]}}}`

// headsBEntry lists layer heads.b of mixed, a Conv2d(64, 64, 3, groups=2).
const headsBEntry = `{"ori_layer_info": {"name": "heads.b", "in_channels": 64, "out_channels": 64, ` +
	`"kernel_size": [3, 3], "stride": [1, 1], "dilation": [1, 1], "groups": 2}, "mode": "SCFK", ` +
	`"decom_nodes": {"first": {"weight_shape": [16, 64, 3, 1]}, "last": {"weight_shape": [64, 16, 1, 3]}}}`

// smallConvEntry lists layer conv of scripts/bad_inputs.py's small model, a
// Conv2d(8, 16, 3, padding=1).
const smallConvEntry = `{"ori_layer_info": {"name": "conv", "in_channels": 8, "out_channels": 16, ` +
	`"kernel_size": [3, 3], "stride": [1, 1], "dilation": [1, 1], "groups": 1}, "mode": "SCFK", ` +
	`"decom_nodes": {"first": {"weight_shape": [4, 8, 3, 1]}, "last": {"weight_shape": [16, 4, 1, 3]}}}`

// batteryCall holds the paths of one run of the binary.
type batteryCall struct {
	// inputs is the folder of shared input files, which no case may change.
	inputs string
	// work is the command's working folder and out the default output
	// path, in the folder work/out.
	work, out string
	// model and info are the case's model and information file.
	model, info string
}

// input returns the path of a file in the shared input folder.
func (c batteryCall) input(name string) string { return filepath.Join(c.inputs, name) }

// apply returns "apply -model M -info I -o OUT" followed by extra.
func (c batteryCall) apply(extra ...string) []string {
	return append([]string{"apply", "-model", c.model, "-info", c.info, "-o", c.out}, extra...)
}

type batteryCase struct {
	name string
	// model is the model file in the input folder: mixed.pt when empty.
	model string
	// info is the text of the information file, written to the input
	// folder before the run. infoFile names a file of the input folder
	// instead: mixed.json, mixed's AMCT file, when both are empty.
	info, infoFile string
	// args returns the command line after the binary's name; nil means
	// c.apply().
	args func(c batteryCall) []string
	// setup prepares the working folder and may skip the case.
	setup func(t *testing.T, c batteryCall)
	// status is the expected exit status, and message lists parts of what
	// the command writes to stderr. With status 1 stderr must be one line.
	status  int
	message []string
}

// TestBattery builds the binary once and runs every case of the bad-input
// battery and of the output-writing checks with it.
func TestBattery(t *testing.T) {
	bin := batteryBinary(t)
	inputs := batteryInputs(t)
	cases := batteryCases(t)

	// The information files of all cases are written before the snapshot,
	// so that every case checks the whole input folder.
	for i := range cases {
		if cases[i].info == "" {
			continue
		}
		name := fmt.Sprintf("case%02d.json", i)
		require.NoError(t, os.WriteFile(filepath.Join(inputs, name), []byte(cases[i].info), 0o644))
		cases[i].infoFile = name
	}
	inputState := snapshotTree(t, inputs)

	t.Run("inputs", func(t *testing.T) {
		for _, tt := range cases {
			t.Run(tt.name, func(t *testing.T) {
				t.Parallel()
				runBatteryCase(t, bin, inputs, tt)
				assert.Equal(t, inputState, snapshotTree(t, inputs), "the input folder changed")
			})
		}
	})
	t.Run("output", func(t *testing.T) {
		testOutputWriting(t, bin, inputs)
		assert.Equal(t, inputState, snapshotTree(t, inputs), "the input folder changed")
	})
}

func runBatteryCase(t *testing.T, bin, inputs string, tt batteryCase) {
	work := t.TempDir()
	require.NoError(t, os.Mkdir(filepath.Join(work, "out"), 0o755))
	c := batteryCall{inputs: inputs, work: work, out: filepath.Join(work, "out", "decomposed.pt")}
	c.model = c.input(defaultString(tt.model, "mixed.pt"))
	c.info = c.input(defaultString(tt.infoFile, "mixed.json"))
	if tt.setup != nil {
		tt.setup(t, c)
	}
	args := c.apply()
	if tt.args != nil {
		args = tt.args(c)
	}
	workState := snapshotTree(t, work)

	status, stdout, stderr := runBinary(t, bin, work, args...)

	assert.Equal(t, tt.status, status, "exit status; stderr: %s", stderr)
	for _, marker := range crashMarkers {
		assert.NotContains(t, stderr, marker, "stderr shows a crash or a backtrace")
	}
	for _, part := range tt.message {
		assert.Contains(t, stderr, part, "stderr must name the culprit")
	}
	if tt.status == 1 {
		assert.True(t, strings.HasPrefix(stderr, "convsplit apply: "), "stderr: %q", stderr)
		assert.Equal(t, 1, strings.Count(stderr, "\n"), "stderr must be one line: %q", stderr)
	}
	assert.NotContains(t, stdout, "wrote ")
	assert.Equal(t, workState, snapshotTree(t, work), "the working folder changed: an output or temporary file was left")
}

// batteryCases returns the table of bad inputs. Every case fails.
func batteryCases(t *testing.T) []batteryCase {
	// down returns mixed's down entry with old replaced by new, as a file.
	down := func(old, new string) string {
		require.Contains(t, downEntry, old)
		return "[" + strings.Replace(downEntry, old, new, 1) + "]"
	}
	mixedText, err := os.ReadFile(testutil.AMCT("mixed", "decompose_info.json"))
	require.NoError(t, err)
	hugeArray := "[" + strings.Repeat("1, ", 1<<20) + "1]"

	return []batteryCase{
		// Models.
		{name: "model empty file", model: "empty.pt", status: 1, message: []string{"empty.pt", "not a ZIP archive"}},
		{name: "model truncated zip", model: "truncated.pt", status: 1, message: []string{"truncated.pt", "zip archive"}},
		{name: "model not a zip", model: "not_zip.pt", status: 1, message: []string{"not_zip.pt", "zip archive"}},
		{name: "model zip without a model", model: "zip_without_model.pt", status: 1, message: []string{"zip_without_model.pt", "version"}},
		{name: "model code with a syntax error", model: "bad_code.pt", status: 1, message: []string{"bad_code.pt"}},
		{name: "model code calling a missing method", model: "bad_types.pt", status: 1, message: []string{"bad_types.pt", "no_such_method"}},
		{name: "model without constants.pkl", model: "no_constants.pt", status: 1, message: []string{"no_constants.pt", "constants.pkl"}},
		{name: "model is a torch.save state dict", model: "state_dict.pt", status: 1, message: []string{"state_dict.pt"}},
		{name: "model is a JSON file", model: "mixed.json", status: 1, message: []string{"mixed.json", "zip archive"}},
		{name: "model is a folder", model: "folder", status: 1, message: []string{"folder", "not a regular file"}},
		{name: "model is missing", model: "missing.pt", status: 1, message: []string{"missing.pt", "no such file"}},
		{name: "model is a FIFO", model: "fifo", status: 1, message: []string{"fifo", "not a regular file"}},
		{
			name: "model unreadable", model: "unreadable.pt", status: 1, message: []string{"unreadable.pt", "permission denied"},
			setup: func(t *testing.T, c batteryCall) { skipIfReadable(t, c.model) },
		},
		{
			name: "model frozen", model: "frozen.pt", infoFile: "small.json",
			status: 1, message: []string{"small.json", "conv", "ori_layer_info.name"},
		},
		{
			name: "layer is a Linear", model: "small.pt", info: "[" + strings.Replace(smallConvEntry, `"conv"`, `"fc"`, 1) + "]",
			status: 1, message: []string{"entry 0 (fc)", "ori_layer_info.name", "Linear"},
		},
		{
			name: "layer is a Sequential", model: "small.pt", info: "[" + strings.Replace(smallConvEntry, `"conv"`, `"seq"`, 1) + "]",
			status: 1, message: []string{"entry 0 (seq)", "ori_layer_info.name", "Sequential"},
		},
		{
			name: "layer constants disagree with its weight", model: "wrong_constants.pt",
			info:   "[" + strings.NewReplacer(`"in_channels": 8`, `"in_channels": 4`, "[4, 8, 3, 1]", "[4, 4, 3, 1]").Replace(smallConvEntry) + "]",
			status: 1, message: []string{"conv", "in_channels"},
		},

		// Information files.
		{name: "info empty", info: " ", status: 1, message: []string{"empty input"}},
		{name: "info truncated JSON", info: string(mixedText[:len(mixedText)/2]), status: 1, message: []string{"invalid JSON"}},
		{name: "info trailing data", info: "[" + downEntry + "] x", status: 1, message: []string{"data after the JSON array"}},
		{name: "info second JSON value", info: "[] []", status: 1, message: []string{"data after the JSON array"}},
		{name: "info not an array", info: `{"down": {}}`, status: 1, message: []string{"want a JSON array", "an object"}},
		{name: "info null", info: "null", status: 1, message: []string{"want a JSON array", "null"}},
		{name: "info byte order mark", info: "\ufeff[]", status: 1, message: []string{"invalid JSON", "line 1"}},
		{name: "info deeply nested", info: strings.Repeat("[", 100000), status: 1, message: []string{"entry 0", "want a JSON object"}},
		{name: "name is a number", info: down(`"name": "down"`, `"name": 7`), status: 1, message: []string{"ori_layer_info.name", "want a string"}},
		{name: "in_channels is a string", info: down(`"in_channels": 128`, `"in_channels": "128"`), status: 1, message: []string{"entry 0 (down)", "ori_layer_info.in_channels", "a string"}},
		{name: "kernel_size is an integer", info: down(`"kernel_size": [3, 3]`, `"kernel_size": 3`), status: 1, message: []string{"(down)", "ori_layer_info.kernel_size", "a number"}},
		{name: "mode is a number", info: down(`"mode": "SCFK"`, `"mode": 1`), status: 1, message: []string{"(down)", "mode", "want a string"}},
		{name: "weight_shape is null", info: down(`"weight_shape": [64, 128, 3, 1]`, `"weight_shape": null`), status: 1, message: []string{"(down)", "decom_nodes.first.weight_shape", "null"}},
		{name: "mode missing", info: down(`"mode": "SCFK", `, ""), status: 1, message: []string{"(down)", `missing key "mode"`}},
		{name: "groups missing", info: down(`, "groups": 1`, ""), status: 1, message: []string{"(down)", "ori_layer_info", `missing key "groups"`}},
		{name: "extra key", info: down(`"groups": 1`, `"groups": 1, "padding": [1, 1]`), status: 1, message: []string{"(down)", `unknown key "padding"`}},
		{name: "repeated key", info: down(`"groups": 1`, `"groups": 1, "groups": 1`), status: 1, message: []string{"(down)", `duplicate key "groups"`}},
		{name: "zero channels", info: down(`"in_channels": 128`, `"in_channels": 0`), status: 1, message: []string{"(down)", "ori_layer_info.in_channels", "got 0"}},
		{name: "negative stride", info: down(`"stride": [2, 2]`, `"stride": [2, -2]`), status: 1, message: []string{"(down)", "ori_layer_info.stride[1]", "-2"}},
		{name: "huge channels", info: down(`"out_channels": 256`, `"out_channels": 2147483648`), status: 1, message: []string{"(down)", "ori_layer_info.out_channels", "maximum"}},
		{name: "number beyond float64", info: down(`"out_channels": 256`, `"out_channels": 1e400`), status: 1, message: []string{"(down)", "ori_layer_info.out_channels", "1e400"}},
		{name: "fractional dimension", info: down(`"in_channels": 128`, `"in_channels": 128.0`), status: 1, message: []string{"(down)", "ori_layer_info.in_channels", "128.0"}},
		{name: "huge array", info: down(`"weight_shape": [64, 128, 3, 1]`, `"weight_shape": `+hugeArray), status: 1, message: []string{"(down)", "decom_nodes.first.weight_shape", "want 4 integers"}},
		{name: "short pair", info: down(`"dilation": [1, 1]`, `"dilation": [1]`), status: 1, message: []string{"(down)", "ori_layer_info.dilation", "want 2 integers, got 1"}},
		{name: "name not UTF-8", info: down(`"name": "down"`, "\"name\": \"d\xffwn\""), status: 1, message: []string{"invalid UTF-8", "line 1"}},
		{name: "name with unpaired surrogate", info: down(`"name": "down"`, `"name": "\udc00"`), status: 1, message: []string{"ori_layer_info.name", "surrogate"}},
		{name: "name with NUL", info: down(`"name": "down"`, `"name": "down\u0000x"`), status: 1, message: []string{`"down\x00x"`, "no module of this name"}},
		{name: "name with trailing dot", info: down(`"name": "down"`, `"name": "down."`), status: 1, message: []string{"(down.)", "no module of this name"}},
		{name: "name of a parameter", info: down(`"name": "down"`, `"name": "down.weight"`), status: 1, message: []string{"(down.weight)", "no module of this name"}},
		{name: "unknown layer", info: down(`"name": "down"`, `"name": "up"`), status: 1, message: []string{"entry 0 (up)", "ori_layer_info.name", "no module of this name"}},
		{name: "empty name with other entries", info: "[" + strings.Replace(downEntry, `"down"`, `""`, 1) + ", " + downEntry + "]", status: 1, message: []string{`entry 0 ("")`, "together with 1 other"}},
		{name: "empty name on a model that is no Conv2d", info: down(`"name": "down"`, `"name": ""`), status: 1, message: []string{`("")`, "Mixed", "not a torch.nn.Conv2d"}},
		{name: "duplicate layer", info: "[" + downEntry + ", " + downEntry + "]", status: 1, message: []string{"entry 1 (down)", "duplicate layer", "entry 0"}},
		{name: "second entry bad", info: "[" + downEntry + ", " + strings.Replace(downEntry, `"down"`, `"tall"`, 1) + "]", status: 1, message: []string{"entry 1 (tall)", "ori_layer_info.in_channels"}},
		{name: "unknown mode", info: down(`"SCFK"`, `"SCXK"`), status: 1, message: []string{"(down)", "mode", "SCXK"}},
		{name: "lower-case mode", info: down(`"SCFK"`, `"scfk"`), status: 1, message: []string{"(down)", "mode", "scfk"}},
		{name: "groups 2", info: "[" + headsBEntry + "]", status: 1, message: []string{"(heads.b)", "ori_layer_info.groups", "2"}},
		{name: "rank mismatch", info: down("[256, 64, 1, 3]", "[256, 32, 1, 3]"), status: 1, message: []string{"(down)", "decom_nodes.last.weight_shape[1]", "rank"}},
		{name: "first input channels mismatch", info: down("[64, 128, 3, 1]", "[64, 64, 3, 1]"), status: 1, message: []string{"(down)", "decom_nodes.first.weight_shape[1]"}},
		{name: "kernel axis wrong for the mode", info: down(`"SCFK"`, `"SCSK"`), status: 1, message: []string{"(down)", "decom_nodes.first.weight_shape[2]", "SCSK"}},
		{name: "stride mismatch", info: down(`"stride": [2, 2]`, `"stride": [1, 1]`), status: 1, message: []string{"(down)", "ori_layer_info.stride", "[2 2]"}},
		{
			name:   "in_channels mismatch",
			info:   "[" + strings.NewReplacer(`"in_channels": 128`, `"in_channels": 64`, "[64, 128, 3, 1]", "[64, 64, 3, 1]").Replace(downEntry) + "]",
			status: 1, message: []string{"(down)", "ori_layer_info.in_channels", "layer has 128"},
		},
		{name: "dilation mismatch", info: down(`"dilation": [1, 1]`, `"dilation": [2, 2]`), status: 1, message: []string{"(down)", "ori_layer_info.dilation"}},
		{name: "info is a folder", infoFile: "folder", status: 1, message: []string{"folder", "is a directory"}},
		{name: "info is missing", infoFile: "missing.json", status: 1, message: []string{"missing.json", "no such file"}},
		{name: "info is a FIFO", infoFile: "fifo", status: 1, message: []string{"fifo", "not a regular file"}},
		{name: "info is a model", infoFile: "small.pt", status: 1, message: []string{"small.pt", "invalid UTF-8"}},
		{
			name: "info unreadable", infoFile: "unreadable.json", status: 1, message: []string{"unreadable.json", "permission denied"},
			setup: func(t *testing.T, c batteryCall) { skipIfReadable(t, c.info) },
		},

		// Command lines.
		{name: "no arguments", args: func(c batteryCall) []string { return nil }, status: 2, message: []string{"usage: convsplit COMMAND"}},
		{name: "unknown command", args: func(c batteryCall) []string { return []string{"split"} }, status: 2, message: []string{`unknown command "split"`}},
		{name: "model flag missing", args: func(c batteryCall) []string { return []string{"apply", "-info", c.info, "-o", c.out} }, status: 2, message: []string{"-model is required"}},
		{name: "info flag missing", args: func(c batteryCall) []string { return []string{"apply", "-model", c.model, "-o", c.out} }, status: 2, message: []string{"-info is required"}},
		{name: "output flag missing", args: func(c batteryCall) []string { return []string{"apply", "-model", c.model, "-info", c.info} }, status: 2, message: []string{"-o is required"}},
		{name: "unknown flag", args: func(c batteryCall) []string { return c.apply("-force") }, status: 2, message: []string{"-force"}},
		{name: "flag after a positional argument", args: func(c batteryCall) []string { return c.apply("extra", "-seed", "1") }, status: 2, message: []string{`unexpected argument "extra"`}},
		{name: "output is the model", args: func(c batteryCall) []string {
			return []string{"apply", "-model", c.model, "-info", c.info, "-o", c.model}
		}, status: 2, message: []string{"would overwrite the input", "-in-place"}},
		{
			name: "output is a relative path to the model",
			args: func(c batteryCall) []string {
				rel, err := filepath.Rel(c.work, c.model)
				if err != nil {
					panic(err)
				}
				return []string{"apply", "-model", c.model, "-info", c.info, "-o", rel}
			},
			status: 2, message: []string{"would overwrite the input"},
		},
		{name: "output is the info file", args: func(c batteryCall) []string {
			return []string{"apply", "-model", c.model, "-info", c.info, "-o", c.info}
		}, status: 2, message: []string{"would overwrite the input", "mixed.json"}},
		{name: "output is the info file with -in-place", args: func(c batteryCall) []string {
			return []string{"apply", "-in-place", "-model", c.model, "-info", c.info, "-o", c.info}
		}, status: 2, message: []string{"would overwrite the input"}},
		{name: "changes is the model", args: func(c batteryCall) []string { return c.apply("-changes", c.model) }, status: 2, message: []string{"-changes", "mixed.pt"}},
		{name: "changes is the output", args: func(c batteryCall) []string { return c.apply("-changes", c.out) }, status: 2, message: []string{"-changes", "decomposed.pt"}},
		{name: "negative seed", args: func(c batteryCall) []string { return c.apply("-seed", "-5") }, status: 2, message: []string{"-seed", "-5"}},
		{name: "seed out of range", args: func(c batteryCall) []string { return c.apply("-seed", "18446744073709551616") }, status: 2, message: []string{"-seed", "out of range"}},
		{name: "seed not a number", args: func(c batteryCall) []string { return c.apply("-seed", "0x1g") }, status: 2, message: []string{"-seed", "0x1g"}},
		{
			name: "output folder missing",
			args: func(c batteryCall) []string {
				return []string{"apply", "-model", c.model, "-info", c.info, "-o", filepath.Join(c.work, "out", "missing", "m.pt")}
			},
			status: 1, message: []string{filepath.Join("missing", "m.pt"), "no such file"},
		},
		{
			name: "output below a regular file",
			setup: func(t *testing.T, c batteryCall) {
				require.NoError(t, os.WriteFile(filepath.Join(c.work, "out", "file"), []byte("a file\n"), 0o644))
			},
			args: func(c batteryCall) []string {
				return []string{"apply", "-model", c.model, "-info", c.info, "-o", filepath.Join(c.work, "out", "file", "m.pt")}
			},
			status: 1, message: []string{filepath.Join("file", "m.pt"), "not a directory"},
		},
		{
			name: "output is a folder",
			setup: func(t *testing.T, c batteryCall) {
				require.NoError(t, os.WriteFile(filepath.Join(c.work, "out", "kept.txt"), []byte("kept\n"), 0o644))
			},
			args: func(c batteryCall) []string {
				return []string{"apply", "-model", c.model, "-info", c.info, "-o", "out"}
			},
			status: 1, message: []string{"out"},
		},
		{
			name: "output folder read-only",
			setup: func(t *testing.T, c batteryCall) {
				mountTmpfs(t, filepath.Join(c.work, "out"), "ro,size=1m")
			},
			status: 1, message: []string{"decomposed.pt", "read-only file system"},
		},
		{
			name: "output file system full",
			setup: func(t *testing.T, c batteryCall) {
				mountTmpfs(t, filepath.Join(c.work, "out"), "size=256k")
				require.NoError(t, os.WriteFile(c.out, []byte("old output\n"), 0o644))
			},
			status: 1, message: []string{"decomposed.pt", "No space left"},
		},
		{
			name: "changes folder missing",
			setup: func(t *testing.T, c batteryCall) {
				require.NoError(t, os.WriteFile(c.out, []byte("old output\n"), 0o644))
			},
			args: func(c batteryCall) []string {
				return c.apply("-changes", filepath.Join(c.work, "out", "missing", "changes.json"))
			},
			status: 1, message: []string{"changes.json", "no such file"},
		},
	}
}

// testOutputWriting checks that an output appears only when complete and
// that an existing output is replaced only on success.
func testOutputWriting(t *testing.T, bin, inputs string) {
	model := filepath.Join(inputs, "mixed.pt")
	info := filepath.Join(inputs, "mixed.json")
	empty := filepath.Join(inputs, "empty.json")
	oldOutput := []byte("old output\n")

	t.Run("failed job keeps the old output", func(t *testing.T) {
		work := t.TempDir()
		out := filepath.Join(work, "decomposed.pt")
		require.NoError(t, os.WriteFile(out, oldOutput, 0o644))
		before := snapshotTree(t, work)
		for _, args := range [][]string{
			{"apply", "-model", model, "-info", filepath.Join(inputs, "small.json"), "-o", out},
			{"apply", "-model", filepath.Join(inputs, "truncated.pt"), "-info", info, "-o", out},
			{"apply", "-model", model, "-info", info, "-o", out, "-seed", "-1"},
			{"apply", "-model", model, "-info", info, "-o", out, "-dry-run"},
		} {
			status, _, stderr := runBinary(t, bin, work, args...)
			assert.Contains(t, []int{0, 1, 2}, status, "stderr: %s", stderr)
			assert.Equal(t, before, snapshotTree(t, work), "after %q", args)
		}
	})

	t.Run("success replaces the old output", func(t *testing.T) {
		work := t.TempDir()
		out := filepath.Join(work, "decomposed.pt")
		require.NoError(t, os.WriteFile(out, oldOutput, 0o644))

		status, stdout, stderr := runBinary(t, bin, work, "apply", "-model", model, "-info", info, "-o", out)
		require.Equal(t, 0, status, "stderr: %s", stderr)
		assert.Contains(t, stdout, "wrote "+out)
		assert.Equal(t, []string{"decomposed.pt"}, listFolder(t, work), "temporary files left")

		// The new output is a complete model: convsplit loads it again.
		status, stdout, stderr = runBinary(t, bin, work, "apply", "-model", out, "-info", empty, "-dry-run")
		assert.Equal(t, 0, status, "stderr: %s", stderr)
		assert.Contains(t, stdout, "0 layers replaced")
	})

	t.Run("failed save keeps a folder in the way", func(t *testing.T) {
		work := t.TempDir()
		out := filepath.Join(work, "decomposed.pt")
		require.NoError(t, os.Mkdir(out, 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(out, "kept.txt"), oldOutput, 0o644))
		before := snapshotTree(t, work)

		status, _, stderr := runBinary(t, bin, work, "apply", "-model", model, "-info", info, "-o", out)
		assert.Equal(t, 1, status, "stderr: %s", stderr)
		assert.Equal(t, before, snapshotTree(t, work))
	})

	t.Run("in-place replaces the model", func(t *testing.T) {
		work := t.TempDir()
		copied := filepath.Join(work, "model.pt")
		data, err := os.ReadFile(filepath.Join(inputs, "small.pt"))
		require.NoError(t, err)
		require.NoError(t, os.WriteFile(copied, data, 0o644))

		status, _, stderr := runBinary(t, bin, work, "apply", "-in-place", "-model", copied, "-info", filepath.Join(inputs, "small.json"), "-o", copied)
		require.Equal(t, 0, status, "stderr: %s", stderr)
		assert.Equal(t, []string{"model.pt"}, listFolder(t, work), "temporary files left")
		replaced, err := os.ReadFile(copied)
		require.NoError(t, err)
		assert.NotEqual(t, data, replaced)
	})

	t.Run("new output mode", func(t *testing.T) {
		work := t.TempDir()
		fresh := filepath.Join(work, "fresh.pt")
		status, _, stderr := runBinary(t, bin, work, "apply", "-model", model, "-info", info, "-o", fresh)
		require.Equal(t, 0, status, "stderr: %s", stderr)
		assert.Equal(t, fs.FileMode(0o666)&^batteryUmask(t), fileMode(t, fresh), "a new output gets 0666 less the umask")
	})

	t.Run("replaced output keeps its mode", func(t *testing.T) {
		work := t.TempDir()
		existing := filepath.Join(work, "existing.pt")
		require.NoError(t, os.WriteFile(existing, oldOutput, 0o640))
		require.NoError(t, os.Chmod(existing, 0o640))
		status, _, stderr := runBinary(t, bin, work, "apply", "-model", model, "-info", info, "-o", existing)
		require.Equal(t, 0, status, "stderr: %s", stderr)
		assert.Equal(t, fs.FileMode(0o640), fileMode(t, existing))
	})
}

// batteryBinary builds the convsplit command into the test's temporary folder.
func batteryBinary(t *testing.T) string {
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

// batteryInputs fills a temporary folder with the battery's input files:
// the files of scripts/bad_inputs.py, mixed.pt and mixed.json (the mixed
// fixture and its AMCT information file), small.json (a valid file for
// small.pt), empty.json ("[]"), a folder, a FIFO, and files that root alone
// can read.
func batteryInputs(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	testutil.RunPython(t, "bad_inputs.py", dir)
	copyInto(t, testutil.Fixture(t, "mixed"), filepath.Join(dir, "mixed.pt"))
	copyInto(t, testutil.AMCT("mixed", "decompose_info.json"), filepath.Join(dir, "mixed.json"))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "small.json"), []byte("["+smallConvEntry+"]"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "empty.json"), []byte("[]"), 0o644))
	require.NoError(t, os.Mkdir(filepath.Join(dir, "folder"), 0o755))
	require.NoError(t, syscall.Mkfifo(filepath.Join(dir, "fifo"), 0o644))
	for _, name := range []string{"unreadable.pt", "unreadable.json"} {
		path := filepath.Join(dir, name)
		copyInto(t, filepath.Join(dir, "small.pt"), path)
		require.NoError(t, os.Chmod(path, 0))
	}
	return dir
}

func copyInto(t *testing.T, src, dst string) {
	t.Helper()
	data, err := os.ReadFile(src)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(dst, data, 0o644))
}

// skipIfReadable skips the test when path opens despite mode 0, as it does
// for root, who ignores permission bits.
func skipIfReadable(t *testing.T, path string) {
	t.Helper()
	if f, err := os.Open(path); err == nil {
		f.Close()
		t.Skipf("%s opens despite mode 0 (running as user %d), so permissions cannot be tested", path, os.Geteuid())
	}
}

// mountTmpfs mounts a tmpfs with the given options on dir for the rest of
// the test, or skips the test when mounting is not allowed.
func mountTmpfs(t *testing.T, dir, options string) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("mounting a tmpfs needs root")
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", options, "tmpfs", dir).CombinedOutput(); err != nil {
		t.Skipf("cannot mount a tmpfs on %s: %v: %s", dir, err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
		}
	})
}

// runBinary runs the binary in folder dir and returns its exit status and
// output. A run that takes more than a minute, for example one that blocks
// on a FIFO, fails the test.
func runBinary(t *testing.T, bin, dir string, args ...string) (status int, stdout, stderr string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Dir = dir
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	require.NoError(t, ctx.Err(), "convsplit %q timed out", args)

	var exitErr *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exitErr):
		status = exitErr.ExitCode()
		if ws, ok := exitErr.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			t.Errorf("convsplit %q was killed by signal %v", args, ws.Signal())
		}
	default:
		require.NoError(t, err)
	}
	return status, out.String(), errOut.String()
}

// snapshotTree describes every entry below dir: its mode and, for files,
// the modification time and the SHA-256 of the content. Folders get no
// time, because a temporary file that was created and removed changes it.
// FIFOs are not opened.
func snapshotTree(t *testing.T, dir string) map[string]string {
	t.Helper()
	tree := map[string]string{}
	err := filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := os.Lstat(path)
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(dir, path)
		if err != nil {
			return err
		}
		if path == dir {
			return nil
		}
		state := info.Mode().String()
		if !info.IsDir() {
			state += " " + info.ModTime().Format(time.RFC3339Nano)
		}
		if info.Mode().IsRegular() && info.Mode().Perm() != 0 {
			data, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			sum := sha256.Sum256(data)
			state += " " + hex.EncodeToString(sum[:])
		}
		tree[rel] = state
		return nil
	})
	require.NoError(t, err)
	return tree
}

func listFolder(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	names := make([]string, len(entries))
	for i, e := range entries {
		names[i] = e.Name()
	}
	return names
}

func fileMode(t *testing.T, path string) fs.FileMode {
	t.Helper()
	info, err := os.Stat(path)
	require.NoError(t, err)
	return info.Mode().Perm()
}

// batteryUmask returns the process's file mode creation mask.
func batteryUmask(t *testing.T) fs.FileMode {
	t.Helper()
	mask := syscall.Umask(0)
	syscall.Umask(mask)
	return fs.FileMode(mask)
}

func defaultString(s, fallback string) string {
	if s == "" {
		return fallback
	}
	return s
}
