package decompose

import (
	"encoding/json"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// amctInfoFiles returns the information files written by AMCT's auto_decomposition.
func amctInfoFiles(t *testing.T) []string {
	t.Helper()
	paths, err := filepath.Glob("../testdata/amct/*/decompose_info.json")
	require.NoError(t, err)
	require.Len(t, paths, 7, "want the resnet18, resnet50, vgg16, mixed, lowrank, root_conv and shared_weight files")
	return paths
}

func TestParseInfoRoundTripAMCTFiles(t *testing.T) {
	for _, path := range amctInfoFiles(t) {
		t.Run(filepath.Base(filepath.Dir(path)), func(t *testing.T) {
			data, err := os.ReadFile(path)
			require.NoError(t, err)

			info, err := ParseInfo(data, path)
			require.NoError(t, err)
			assert.NotEmpty(t, info.Entries)
			assert.Equal(t, string(data), string(info.Marshal()))

			read, err := ReadInfo(path)
			require.NoError(t, err)
			assert.Equal(t, info, read)
		})
	}
}

func TestParseInfoValues(t *testing.T) {
	info, err := ReadInfo("../testdata/amct/mixed/decompose_info.json")
	require.NoError(t, err)
	require.Len(t, info.Entries, 6)

	want := Entry{
		Layer: LayerInfo{
			Name: "blocks.0", InChannels: 128, OutChannels: 64,
			KernelSize: [2]int{5, 3}, Stride: [2]int{1, 1}, Dilation: [2]int{1, 1}, Groups: 1,
		},
		Mode:       FCSK,
		FirstShape: [4]int{32, 128, 5, 1},
		LastShape:  [4]int{64, 32, 1, 3},
	}
	assert.Equal(t, want, info.Entries[3])
	assert.Equal(t, 32, info.Entries[3].Rank())

	names := make([]string, 0, len(info.Entries))
	for _, entry := range info.Entries {
		names = append(names, entry.Layer.Name)
	}
	assert.Equal(t, []string{"down", "tall", "squeeze", "blocks.0", "blocks.1", "tail.0.1"}, names)
}

func TestParseInfoRootLayerName(t *testing.T) {
	info, err := ReadInfo("../testdata/amct/root_conv/decompose_info.json")
	require.NoError(t, err)
	require.Len(t, info.Entries, 1)
	assert.Equal(t, "", info.Entries[0].Layer.Name)
}

func TestParseInfoEmptyArray(t *testing.T) {
	info, err := ParseInfo([]byte(" [ ]\n"), "empty.json")
	require.NoError(t, err)
	assert.Empty(t, info.Entries)
	assert.Equal(t, "[]", string(info.Marshal()))
}

func TestParseInfoAcceptsOtherLayouts(t *testing.T) {
	compact := "[" + goodEntry + "]"
	reordered := `[{"decom_nodes": {"last": {"weight_shape": [128, 32, 1, 3]}, "first": {"weight_shape": [32, 64, 3, 1]}},` +
		` "mode": "SCFK", "ori_layer_info": {"groups": 1, "dilation": [1, 1], "stride": [1, 1], "kernel_size": [3, 3],` +
		` "out_channels": 128, "in_channels": 64, "name": "conv"}}]`

	first, err := ParseInfo([]byte(compact), "compact.json")
	require.NoError(t, err)
	second, err := ParseInfo([]byte(reordered), "reordered.json")
	require.NoError(t, err)
	assert.Equal(t, first, second)
}

// goodEntry is a valid entry in compact layout. The bad inputs below are edits of it.
const goodEntry = `{"ori_layer_info": {"name": "conv", "in_channels": 64, "out_channels": 128, ` +
	`"kernel_size": [3, 3], "stride": [1, 1], "dilation": [1, 1], "groups": 1}, "mode": "SCFK", ` +
	`"decom_nodes": {"first": {"weight_shape": [32, 64, 3, 1]}, "last": {"weight_shape": [128, 32, 1, 3]}}}`

// badEntry returns a one-entry array with the first occurrence of old in goodEntry replaced by new.
func badEntry(t *testing.T, old, new string) string {
	t.Helper()
	require.Contains(t, goodEntry, old)
	return "[" + strings.Replace(goodEntry, old, new, 1) + "]"
}

func TestParseInfoRejectsBadInput(t *testing.T) {
	tests := []struct {
		name     string
		input    string
		kinds    []error
		messages []string // substrings of the error message
	}{
		{"empty input", "  \n", nil, []string{"empty input"}},
		{"object at top", "{}", nil, []string{"want a JSON array of entries, got an object"}},
		{"null at top", "null", nil, []string{"want a JSON array of entries, got null"}},
		{"trailing comma", "[" + goodEntry + ",]", nil, []string{"entry 1: invalid JSON near line 1"}},
		{"truncated array", "[" + goodEntry, nil, []string{"unexpected end of input"}},
		{"truncated entry", "[" + goodEntry[:40], nil, []string{"entry 0: invalid JSON: unexpected end of input"}},
		{"trailing data", "[" + goodEntry + "]\n x", nil, []string{"data after the JSON array at line 2"}},
		{"second array", "[" + goodEntry + "][]", nil, []string{"data after the JSON array"}},
		{"invalid UTF-8", badEntry(t, `"conv"`, "\"co\xffnv\""), nil, []string{"invalid UTF-8 at line 1, column 33"}},
		{"entry not an object", "[1]", nil, []string{"entry 0: want a JSON object, got a number"}},
		{"unknown entry key", badEntry(t, `"mode": "SCFK"`, `"mode": "SCFK", "rank": 32`), nil,
			[]string{"entry 0 (conv): unknown key \"rank\""}},
		{"unknown layer key", badEntry(t, `"groups": 1`, `"groups": 1, "padding": [1, 1]`), nil,
			[]string{"entry 0 (conv): ori_layer_info: unknown key \"padding\""}},
		{"missing mode", badEntry(t, `"mode": "SCFK", `, ``), nil, []string{"entry 0 (conv): missing key \"mode\""}},
		{"missing groups", badEntry(t, `, "groups": 1`, ``), nil,
			[]string{"entry 0 (conv): ori_layer_info: missing key \"groups\""}},
		{"missing last node", badEntry(t, `, "last": {"weight_shape": [128, 32, 1, 3]}`, ``), nil,
			[]string{"decom_nodes: missing key \"last\""}},
		{"extra node", badEntry(t, `"last":`, `"middle": {}, "last":`), nil,
			[]string{"decom_nodes: unknown key \"middle\""}},
		{"duplicate key", badEntry(t, `"mode": "SCFK"`, `"mode": "SCFK", "mode": "SCFK"`), nil,
			[]string{"entry 0 (conv): duplicate key \"mode\""}},
		{"name not a string", badEntry(t, `"name": "conv"`, `"name": 5`), nil,
			[]string{"entry 0: ori_layer_info.name: want a string, got a number"}},
		{"name with unpaired surrogate", badEntry(t, `"name": "conv"`, `"name": "conv\ud800"`), nil,
			[]string{"ori_layer_info.name: string contains an unpaired UTF-16 surrogate escape"}},
		{"layer info null", badEntry(t, `"ori_layer_info": {"name": "conv", "in_channels": 64, "out_channels": 128, `+
			`"kernel_size": [3, 3], "stride": [1, 1], "dilation": [1, 1], "groups": 1}`, `"ori_layer_info": null`), nil,
			[]string{"entry 0: ori_layer_info: want a JSON object, got null"}},
		{"channels as string", badEntry(t, `"in_channels": 64`, `"in_channels": "64"`), nil,
			[]string{"entry 0 (conv): ori_layer_info.in_channels: want a positive integer, got a string"}},
		{"channels as float", badEntry(t, `"in_channels": 64`, `"in_channels": 64.0`), nil,
			[]string{"ori_layer_info.in_channels: want a positive integer, got 64.0"}},
		{"channels with exponent", badEntry(t, `"out_channels": 128`, `"out_channels": 1.28e2`), nil,
			[]string{"ori_layer_info.out_channels: want a positive integer, got 1.28e2"}},
		{"groups as boolean", badEntry(t, `"groups": 1`, `"groups": true`), nil,
			[]string{"ori_layer_info.groups: want a positive integer, got a boolean"}},
		{"zero stride", badEntry(t, `"stride": [1, 1]`, `"stride": [0, 1]`), nil,
			[]string{"ori_layer_info.stride[0]: want a positive integer, got 0"}},
		{"negative dilation", badEntry(t, `"dilation": [1, 1]`, `"dilation": [1, -2]`), nil,
			[]string{"ori_layer_info.dilation[1]: want a positive integer, got -2"}},
		{"negative beyond int64", badEntry(t, `"groups": 1`, `"groups": -99999999999999999999`), nil,
			[]string{"ori_layer_info.groups: want a positive integer, got -99999999999999999999"}},
		{"negative zero", badEntry(t, `"groups": 1`, `"groups": -0`), nil,
			[]string{"ori_layer_info.groups: want a positive integer, got -0"}},
		{"dimension above maximum", badEntry(t, `"in_channels": 64`, `"in_channels": 1048577`), nil,
			[]string{"ori_layer_info.in_channels: 1048577 is above the maximum 1048576"}},
		{"dimension above int64", badEntry(t, `[32, 64, 3, 1]`, `[99999999999999999999999, 64, 3, 1]`), nil,
			[]string{"decom_nodes.first.weight_shape[0]: 99999999999999999999999 is above the maximum"}},
		{"kernel size as number", badEntry(t, `"kernel_size": [3, 3]`, `"kernel_size": 3`), nil,
			[]string{"ori_layer_info.kernel_size: want 2 integers, got a number"}},
		{"stride with three elements", badEntry(t, `"stride": [1, 1]`, `"stride": [1, 1, 1]`), nil,
			[]string{"ori_layer_info.stride: want 2 integers, got 3"}},
		{"short weight shape", badEntry(t, `[32, 64, 3, 1]`, `[32, 64, 3]`), nil,
			[]string{"entry 0 (conv): decom_nodes.first.weight_shape: want 4 integers, got 3"}},
		{"long weight shape", badEntry(t, `[128, 32, 1, 3]`, `[128, 32, 1, 3, [1, {"a": []}], 7]`), nil,
			[]string{"decom_nodes.last.weight_shape: want 4 integers, got 6"}},
		{"null in weight shape", badEntry(t, `[32, 64, 3, 1]`, `[32, 64, null, 1]`), nil,
			[]string{"decom_nodes.first.weight_shape[2]: want a positive integer, got null"}},
		{"weight shape not in object", badEntry(t, `{"weight_shape": [32, 64, 3, 1]}`, `[32, 64, 3, 1]`), nil,
			[]string{"decom_nodes.first: want a JSON object, got an array"}},
		{"unknown mode", badEntry(t, `"SCFK"`, `"SCXK"`), []error{ErrUnknownMode},
			[]string{"entry 0 (conv): mode: unknown mode \"SCXK\", want FCFK, FCSK, SCFK or SCSK"}},
		{"lowercase mode", badEntry(t, `"SCFK"`, `"scfk"`), []error{ErrUnknownMode}, []string{"mode: unknown mode \"scfk\""}},
		{"mode as number", badEntry(t, `"SCFK"`, `1`), nil, []string{"mode: want a string, got a number"}},
		{"duplicate layer", "[" + goodEntry + ",\n" + goodEntry + "]", []error{ErrDuplicateLayer},
			[]string{"entry 1 (conv): ori_layer_info.name: duplicate layer, already listed in entry 0"}},
		{"duplicate root layer", "[" + strings.Replace(goodEntry, `"conv"`, `""`, 1) + "," +
			strings.Replace(goodEntry, `"conv"`, `""`, 1) + "]", []error{ErrDuplicateLayer},
			[]string{`entry 1 (""): ori_layer_info.name: duplicate layer, already listed in entry 0`}},
	}
	for _, test := range tests {
		t.Run(test.name, func(t *testing.T) {
			info, err := ParseInfo([]byte(test.input), "bad.json")
			require.Error(t, err)
			assert.Nil(t, info)

			assert.ErrorIs(t, err, ErrInvalidInfo)
			for _, kind := range test.kinds {
				assert.ErrorIs(t, err, kind)
			}
			for _, sentinel := range []error{ErrUnknownMode, ErrDuplicateLayer, ErrInfoFile, ErrInconsistentShapes} {
				if !containsError(test.kinds, sentinel) {
					assert.NotErrorIs(t, err, sentinel)
				}
			}

			assert.True(t, strings.HasPrefix(err.Error(), "bad.json: "), "message %q does not start with the source", err)
			for _, message := range test.messages {
				assert.Contains(t, err.Error(), message)
			}
		})
	}
}

func containsError(list []error, target error) bool {
	for _, err := range list {
		if err == target {
			return true
		}
	}
	return false
}

func TestParseInfoEntryLimit(t *testing.T) {
	if testing.Short() {
		t.Skip("builds a 30 MB input")
	}
	var b strings.Builder
	b.WriteString("[")
	for i := 0; i <= maxEntries; i++ {
		if i > 0 {
			b.WriteString(",")
		}
		b.WriteString(strings.Replace(goodEntry, `"conv"`, `"conv`+strconv.Itoa(i)+`"`, 1))
	}
	b.WriteString("]")

	_, err := ParseInfo([]byte(b.String()), "many.json")
	require.Error(t, err)
	assert.ErrorIs(t, err, ErrInvalidInfo)
	assert.Contains(t, err.Error(), "more than the maximum of 100000 entries")
}

func TestParseInfoWithoutSource(t *testing.T) {
	_, err := ParseInfo([]byte("[1]"), "")
	require.Error(t, err)
	assert.Equal(t, "entry 0: want a JSON object, got a number", err.Error())
}

func TestReadInfoFileErrors(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.json")
	fifo := filepath.Join(dir, "fifo.json")
	require.NoError(t, syscall.Mkfifo(fifo, 0o600))

	tests := []struct {
		name    string
		path    string
		message string
	}{
		{"missing file", missing, missing + ": no such file or directory"},
		{"directory", dir, dir + " is a directory"},
		{"named pipe", fifo, fifo + " is not a regular file"},
	}
	for _, test := range tests {
		t.Run(test.name, func(t *testing.T) {
			info, err := ReadInfo(test.path)
			require.Error(t, err)
			assert.Nil(t, info)
			assert.ErrorIs(t, err, ErrInfoFile)
			assert.NotErrorIs(t, err, ErrInvalidInfo)
			assert.Contains(t, err.Error(), test.message)
		})
	}

	_, err := ReadInfo(missing)
	assert.ErrorIs(t, err, fs.ErrNotExist)
}

func TestReadInfoUnreadableFile(t *testing.T) {
	if os.Geteuid() == 0 {
		t.Skip("root can read a file without read permission")
	}
	path := filepath.Join(t.TempDir(), "secret.json")
	require.NoError(t, os.WriteFile(path, []byte("[]"), 0o200))

	_, err := ReadInfo(path)
	require.Error(t, err)
	assert.ErrorIs(t, err, ErrInfoFile)
	assert.ErrorIs(t, err, fs.ErrPermission)
	assert.Contains(t, err.Error(), path)
}

func TestReadInfoNamesPathInParseErrors(t *testing.T) {
	path := filepath.Join(t.TempDir(), "bad.json")
	require.NoError(t, os.WriteFile(path, []byte(badEntry(t, `"SCFK"`, `"XXXX"`)), 0o644))

	_, err := ReadInfo(path)
	require.Error(t, err)
	assert.ErrorIs(t, err, ErrUnknownMode)
	assert.ErrorIs(t, err, ErrInvalidInfo)
	assert.NotErrorIs(t, err, ErrInfoFile)
	assert.Equal(t, path+`: entry 0 (conv): mode: unknown mode "XXXX", want FCFK, FCSK, SCFK or SCSK`, err.Error())
}

func TestMarshalEscapesLikePython(t *testing.T) {
	name := "x\x7f\x01\"\\/\u00e9\U0001F600<>&\u2028\b\f\n\r\t"
	info := &Info{Entries: []Entry{validEntry(name, SCFK)}}

	data := info.Marshal()
	// Python 3.11: json.dumps({"name": name}, indent="\t") writes this literal.
	assert.Contains(t, string(data), "\t\t\t\"name\": \"x\\u007f\\u0001\\\"\\\\/\\u00e9\\ud83d\\ude00<>&\\u2028\\b\\f\\n\\r\\t\",\n")

	read, err := ParseInfo(data, "escaped.json")
	require.NoError(t, err)
	assert.Equal(t, info, read)
}

func TestMarshalNilInfo(t *testing.T) {
	var info *Info
	assert.Equal(t, "[]", string(info.Marshal()))
}

// validEntry returns an entry that passes Check: in 64, out 128, kernel (3, 5), rank 32.
func validEntry(name string, mode Mode) Entry {
	entry := Entry{
		Layer: LayerInfo{
			Name: name, InChannels: 64, OutChannels: 128,
			KernelSize: [2]int{3, 5}, Stride: [2]int{1, 1}, Dilation: [2]int{1, 1}, Groups: 1,
		},
		Mode:       mode,
		FirstShape: [4]int{32, 64, 3, 1},
		LastShape:  [4]int{128, 32, 1, 5},
	}
	if !mode.firstKeepsHeight() {
		entry.FirstShape = [4]int{32, 64, 1, 5}
		entry.LastShape = [4]int{128, 32, 3, 1}
	}
	return entry
}

func TestEntryCheckAcceptsEveryMode(t *testing.T) {
	for _, mode := range []Mode{FCFK, FCSK, SCFK, SCSK} {
		t.Run(string(mode), func(t *testing.T) {
			assert.NoError(t, validEntry("conv", mode).Check())
		})
	}
}

func TestEntryCheckRejectsInconsistentEntries(t *testing.T) {
	tests := []struct {
		name    string
		mode    Mode
		edit    func(*Entry)
		kind    error
		message string
	}{
		{"first input channels", SCFK, func(e *Entry) { e.FirstShape[1] = 63 }, ErrInconsistentShapes,
			"layer conv: decom_nodes.first.weight_shape[1]: input channels 63 differ from ori_layer_info.in_channels 64"},
		{"last output channels", FCFK, func(e *Entry) { e.LastShape[0] = 64 }, ErrInconsistentShapes,
			"layer conv: decom_nodes.last.weight_shape[0]: output channels 64 differ from ori_layer_info.out_channels 128"},
		{"rank", FCSK, func(e *Entry) { e.LastShape[1] = 33 }, ErrInconsistentShapes,
			"layer conv: decom_nodes.last.weight_shape[1]: input channels 33 differ from the rank 32"},
		{"SCFK with SCSK kernels", SCFK, func(e *Entry) { e.Mode = SCSK }, ErrInconsistentShapes,
			"layer conv: decom_nodes.first.weight_shape[2]: kernel height is 3, want 1 for mode SCSK"},
		{"FCFK with FCSK kernels", FCFK, func(e *Entry) { e.Mode = FCSK }, ErrInconsistentShapes,
			"decom_nodes.first.weight_shape[2]: kernel height is 1, want 3 for mode FCSK and kernel_size [3 5]"},
		{"first kernel width", SCFK, func(e *Entry) { e.FirstShape[3] = 5 }, ErrInconsistentShapes,
			"decom_nodes.first.weight_shape[3]: kernel width is 5, want 1 for mode SCFK"},
		{"last kernel height", SCSK, func(e *Entry) { e.LastShape[2] = 5 }, ErrInconsistentShapes,
			"decom_nodes.last.weight_shape[2]: kernel height is 5, want 3 for mode SCSK"},
		{"last kernel width", FCSK, func(e *Entry) { e.LastShape[3] = 3 }, ErrInconsistentShapes,
			"decom_nodes.last.weight_shape[3]: kernel width is 3, want 5 for mode FCSK"},
		{"groups", SCFK, func(e *Entry) { e.Layer.Groups = 2 }, ErrUnsupportedGroups,
			"layer conv: ori_layer_info.groups: groups is 2, but only 1 is supported"},
		{"unknown mode", SCFK, func(e *Entry) { e.Mode = "SCFX" }, ErrUnknownMode,
			`layer conv: mode: unknown mode "SCFX"`},
		{"empty mode", SCFK, func(e *Entry) { e.Mode = "" }, ErrUnknownMode, `mode: unknown mode ""`},
		{"zero rank", SCFK, func(e *Entry) { e.FirstShape[0], e.LastShape[1] = 0, 0 }, ErrInvalidInfo,
			"layer conv: decom_nodes.first.weight_shape[0]: want a positive integer, got 0"},
		{"negative stride", SCFK, func(e *Entry) { e.Layer.Stride[1] = -1 }, ErrInvalidInfo,
			"ori_layer_info.stride[1]: want a positive integer, got -1"},
		{"huge channels", SCFK, func(e *Entry) { e.Layer.InChannels, e.FirstShape[1] = 1<<21, 1<<21 }, ErrInvalidInfo,
			"ori_layer_info.in_channels: 2097152 is above the maximum 1048576"},
	}
	for _, test := range tests {
		t.Run(test.name, func(t *testing.T) {
			entry := validEntry("conv", test.mode)
			test.edit(&entry)

			err := entry.Check()
			require.Error(t, err)
			assert.ErrorIs(t, err, test.kind)
			assert.Contains(t, err.Error(), test.message)
		})
	}
}

func TestEntryCheckNamesRootLayer(t *testing.T) {
	entry := validEntry("", SCFK)
	entry.LastShape[0] = 1

	err := entry.Check()
	require.Error(t, err)
	assert.True(t, strings.HasPrefix(err.Error(), `layer "": `), "message %q", err)
}

func TestInfoCheckAMCTFiles(t *testing.T) {
	for _, path := range amctInfoFiles(t) {
		info, err := ReadInfo(path)
		require.NoError(t, err)
		assert.NoError(t, info.Check(), path)
	}
}

func TestInfoCheckNamesEntry(t *testing.T) {
	bad := validEntry("layer2.conv", SCSK)
	bad.LastShape[2] = 7
	info := &Info{Entries: []Entry{validEntry("layer1.conv", SCFK), bad}}

	err := info.Check()
	require.Error(t, err)
	assert.ErrorIs(t, err, ErrInconsistentShapes)
	assert.Equal(t, "entry 1 (layer2.conv): decom_nodes.last.weight_shape[2]: kernel height is 7, want 3 for mode SCSK and kernel_size [3 5]", err.Error())
	// Info.Check reports the entry index without changing the error that Entry.Check returns.
	assert.True(t, strings.HasPrefix(bad.Check().Error(), "layer layer2.conv: "))
}

func TestInfoCheckDuplicateLayer(t *testing.T) {
	info := &Info{Entries: []Entry{validEntry("a", SCFK), validEntry("b", FCFK), validEntry("a", SCSK)}}

	err := info.Check()
	require.Error(t, err)
	assert.ErrorIs(t, err, ErrDuplicateLayer)
	assert.NotErrorIs(t, err, ErrInvalidInfo)
	assert.Equal(t, "entry 2 (a): ori_layer_info.name: duplicate layer, already listed in entry 0", err.Error())
}

func TestInfoWriteFileMatchesAMCT(t *testing.T) {
	dir := t.TempDir()
	for _, source := range amctInfoFiles(t) {
		info, err := ReadInfo(source)
		require.NoError(t, err)

		path := filepath.Join(dir, filepath.Base(filepath.Dir(source))+".json")
		require.NoError(t, info.WriteFile(path))

		want, err := os.ReadFile(source)
		require.NoError(t, err)
		got, err := os.ReadFile(path)
		require.NoError(t, err)
		assert.Equal(t, string(want), string(got), source)
	}
	assertOnlyFiles(t, dir, "lowrank.json", "mixed.json", "resnet18.json", "resnet50.json",
		"root_conv.json", "shared_weight.json", "vgg16.json")
}

func TestInfoWriteFileReplacesFile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "decompose_info.json")
	require.NoError(t, os.WriteFile(path, []byte("old content"), 0o640))

	info := &Info{Entries: []Entry{validEntry("conv", FCFK)}}
	require.NoError(t, info.WriteFile(path))

	got, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, info.Marshal(), got)
	stat, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, fs.FileMode(0o640), stat.Mode().Perm())
	assertOnlyFiles(t, dir, "decompose_info.json")
}

func TestInfoWriteFileNewFileMode(t *testing.T) {
	path := filepath.Join(t.TempDir(), "new.json")
	require.NoError(t, (&Info{}).WriteFile(path))

	stat, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, fs.FileMode(0o644), stat.Mode().Perm())
	got, err := os.ReadFile(path)
	require.NoError(t, err)
	assert.Equal(t, "[]", string(got))
}

func TestInfoWriteFileFollowsSymlink(t *testing.T) {
	dir := t.TempDir()
	target := filepath.Join(dir, "target.json")
	link := filepath.Join(dir, "link.json")
	require.NoError(t, os.WriteFile(target, []byte("old"), 0o644))
	require.NoError(t, os.Symlink("target.json", link))

	info := &Info{Entries: []Entry{validEntry("conv", SCFK)}}
	require.NoError(t, info.WriteFile(link))

	got, err := os.ReadFile(target)
	require.NoError(t, err)
	assert.Equal(t, info.Marshal(), got)
	stat, err := os.Lstat(link)
	require.NoError(t, err)
	assert.Equal(t, fs.ModeSymlink, stat.Mode().Type())
}

func TestInfoWriteFileRejectsInvalidInfo(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "bad.json")
	entry := validEntry("conv", SCFK)
	entry.Layer.Stride[0] = 0
	info := &Info{Entries: []Entry{entry}}

	err := info.WriteFile(path)
	require.Error(t, err)
	assert.ErrorIs(t, err, ErrInvalidInfo)
	assert.Equal(t, "write "+path+": entry 0 (conv): ori_layer_info.stride[0]: want a positive integer, got 0", err.Error())
	assertOnlyFiles(t, dir)
}

func TestInfoWriteFileMissingFolder(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "missing", "out.json")

	err := (&Info{}).WriteFile(path)
	require.Error(t, err)
	assert.ErrorIs(t, err, fs.ErrNotExist)
	assert.Contains(t, err.Error(), path)
	assertOnlyFiles(t, dir)
}

func TestInfoWriteFileOntoFolder(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "folder")
	require.NoError(t, os.Mkdir(path, 0o755))

	err := (&Info{}).WriteFile(path)
	require.Error(t, err)
	assertOnlyFiles(t, dir, "folder")
}

// assertOnlyFiles checks that dir contains exactly the named entries, so no temporary file is left.
func assertOnlyFiles(t *testing.T, dir string, names ...string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	got := make([]string, 0, len(entries))
	for _, entry := range entries {
		got = append(got, entry.Name())
	}
	if names == nil {
		names = []string{}
	}
	assert.ElementsMatch(t, names, got)
}

func TestParseInfoSyntaxErrorWrapsCause(t *testing.T) {
	_, err := ParseInfo([]byte("["+goodEntry+" "+goodEntry+"]"), "x.json")
	require.Error(t, err)

	var syntax *json.SyntaxError
	assert.ErrorAs(t, err, &syntax)
	assert.ErrorIs(t, err, ErrInvalidInfo)
	assert.Contains(t, err.Error(), "x.json: entry 1: invalid JSON near line 1, column ")
	assert.Contains(t, err.Error(), "invalid character '{' after array element")
}

// addAMCTSeeds adds every information file that AMCT wrote to the seed corpus.
func addAMCTSeeds(f *testing.F) {
	paths, err := filepath.Glob("../testdata/amct/*/decompose_info.json")
	require.NoError(f, err)
	for _, path := range paths {
		data, err := os.ReadFile(path)
		require.NoError(f, err)
		f.Add(data)
	}
}

// FuzzParseInfo checks that ParseInfo never panics and that whatever it
// accepts survives Marshal and a second ParseInfo unchanged.
func FuzzParseInfo(f *testing.F) {
	addAMCTSeeds(f)
	f.Add([]byte("[" + goodEntry + "]"))
	f.Add([]byte(`[{"ori_layer_info": {"name": "\ud83d\ude00\u0000"}}]`))

	f.Fuzz(func(t *testing.T, data []byte) {
		info, err := ParseInfo(data, "fuzz.json")
		if err != nil {
			require.ErrorIs(t, err, ErrInvalidInfo)
			return
		}
		again, err := ParseInfo(info.Marshal(), "marshaled.json")
		require.NoError(t, err)
		require.Equal(t, info, again)
	})
}
