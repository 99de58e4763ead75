package main

import (
	"bytes"
	"encoding/json"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/convsplit/convsplit/internal/testutil"
)

// pythonCosts computes, with forward hooks on the eager model of
// zoo_models.py, each Conv2d's parameters and MACs for one batch item, before
// and after scripts/amct_eager.py restructures it as the information file
// specifies.
const pythonCosts = `
import json, sys
import torch
sys.path.insert(0, sys.argv[1])
import amct_eager, zoo_models

def costs(model, shape):
    layers = []
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            record = {'name': name, 'params': sum(p.numel() for p in m.parameters()), 'macs': 0}
            layers.append(record)
            def hook(m, args, out, record=record):
                kh, kw = m.kernel_size
                record['macs'] += out.shape[-2] * out.shape[-1] * m.out_channels * (m.in_channels // m.groups) * kh * kw
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.zeros(shape))
    return {'layers': layers, 'params': sum(p.numel() for p in model.parameters())}

shape = [int(s) for s in sys.argv[4].split('x')]
before = costs(zoo_models.build(sys.argv[2]).eval(), shape)
model, _ = amct_eager.decompose_network(zoo_models.build(sys.argv[2]).eval(), amct_eager.load_info(sys.argv[3]))
after = costs(model.eval(), shape)
print(json.dumps({'before': before, 'after': after}))
`

type pythonCost struct {
	Layers []struct {
		Name   string `json:"name"`
		Params int64  `json:"params"`
		MACs   int64  `json:"macs"`
	} `json:"layers"`
	Params int64 `json:"params"`
}

func assertCosts(t *testing.T, want pythonCost, got modelCost) {
	t.Helper()
	require.Len(t, got.Layers, len(want.Layers))
	var macs, convParams int64
	for i, w := range want.Layers {
		g := got.Layers[i]
		assert.Equal(t, w.Name, g.Name)
		assert.Equal(t, w.Params, g.Params, "params of %s", w.Name)
		assert.Equal(t, w.MACs, g.MACs, "MACs of %s", w.Name)
		assert.True(t, g.Measured, "layer %s: %s", g.Name, g.Unmeasured)
		macs += w.MACs
		convParams += w.Params
	}
	assert.Equal(t, macs, got.MACs)
	assert.Equal(t, convParams, got.Conv2dParams)
	assert.Equal(t, want.Params, got.Params)
	assert.Zero(t, got.Unmeasured)
}

func runInspectJSON(t *testing.T, args ...string) inspectReport {
	t.Helper()
	var stdout, stderr bytes.Buffer
	code := run(append([]string{"inspect", "-json"}, args...), &stdout, &stderr)
	require.Equal(t, 0, code, "stderr: %s", stderr.String())
	var report inspectReport
	require.NoError(t, json.Unmarshal(stdout.Bytes(), &report))
	return report
}

func TestInspectMixedMatchesPython(t *testing.T) {
	info := testutil.AMCT("mixed", "decompose_info.json")
	out := testutil.PythonCode(t, pythonCosts, testutil.Path("scripts"), "mixed", info, "2x3x24x20")
	var want struct{ Before, After pythonCost }
	require.NoError(t, json.Unmarshal([]byte(out), &want))

	for _, fixture := range []string{"mixed", "mixed_traced"} {
		t.Run(fixture, func(t *testing.T) {
			report := runInspectJSON(t, "-model", testutil.Fixture(t, fixture), "-info", info, "-input", "2x3x24x20")
			assert.Equal(t, []int64{2, 3, 24, 20}, report.Before.Input)
			assertCosts(t, want.Before, report.Before)
			require.NotNil(t, report.After)
			assertCosts(t, want.After, *report.After)

			require.Len(t, report.Replaced, 6)
			down := report.Replaced[0]
			assert.Equal(t, "down", down.Name)
			assert.Equal(t, [2]string{"down.0", "down.1"}, down.NewLayers)
			assert.Equal(t, report.Before.layerByName("down").MACs, down.MACsBefore)
			assert.Equal(t, report.After.layerByName("down.0").MACs+report.After.layerByName("down.1").MACs, down.MACsAfter)
		})
	}
}

func TestInspectAMCTDecisions(t *testing.T) {
	report := runInspectJSON(t, "-model", testutil.Fixture(t, "mixed"), "-input", "1x3x16x16")
	// The decisions noted beside each layer in zoo_models.py, which AMCT's
	// auto_decomposition made.
	want := map[string]string{
		"stem": "", "down": "SCFK", "tall": "SCSK", "squeeze": "FCFK", "blocks.0": "FCSK",
		"blocks.1": "SCFK", "heads.a": "", "heads.b": "", "tail.0.1": "SCFK",
	}
	require.Len(t, report.Before.Layers, len(want))
	for _, l := range report.Before.Layers {
		assert.Equal(t, want[l.Name], l.AMCTMode, "layer %s", l.Name)
		assert.Equal(t, want[l.Name] != "", l.AMCTDecomposes, "layer %s", l.Name)
		if !l.AMCTDecomposes {
			assert.NotEmpty(t, l.AMCTReason, "layer %s", l.Name)
		}
	}
	assert.Equal(t, 6, report.Before.AMCTDecomposable)
	assert.Nil(t, report.After)
}

func TestInspectDefaultInput(t *testing.T) {
	report := runInspectJSON(t, "-model", testutil.Fixture(t, "root_conv"))
	assert.Equal(t, []int64{1, 64, 224, 224}, report.Before.Input, "in_channels of the first Conv2d")
	require.Len(t, report.Before.Layers, 1)
	layer := report.Before.Layers[0]
	assert.Equal(t, "", layer.Name)
	assert.Equal(t, []int64{1, 128, 224, 224}, layer.Output)
	assert.Equal(t, int64(224*224*128*64*9), layer.MACs)
}

func TestInspectTable(t *testing.T) {
	dir := t.TempDir()
	testutil.RunPython(t, "bad_models.py", dir)
	var stdout, stderr bytes.Buffer
	code := run([]string{"inspect", "-model", filepath.Join(dir, "weight_reader.pt"), "-input", "1x16x8x8"}, &stdout, &stderr)
	require.Equal(t, 0, code, "stderr: %s", stderr.String())

	text := stdout.String()
	for _, part := range []string{
		"LAYER", "MACS", "AMCT", "first", "reader", "1x16x8x8",
		"2 Conv2d layers, 0 that AMCT's rules would decompose",
		"not measured, MACs not counted: reader:",
	} {
		assert.Contains(t, text, part)
	}
}

func TestInspectTableWithInfo(t *testing.T) {
	var stdout, stderr bytes.Buffer
	code := run([]string{"inspect", "-model", testutil.Fixture(t, "mixed"), "-input", "1x3x16x16",
		"-info", testutil.AMCT("mixed", "decompose_info.json")}, &stdout, &stderr)
	require.Equal(t, 0, code, "stderr: %s", stderr.String())
	for _, part := range []string{"after restructuring with", "6 layers replaced", "replaced layers", "down.0", "down.1",
		"parameters in the state dict: 1814752 before, 556256 after (30.7%)"} {
		assert.Contains(t, stdout.String(), part)
	}
}

func TestInspectUsageErrors(t *testing.T) {
	model := testutil.Fixture(t, "root_conv")
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no model", nil, "-model is required"},
		{"extra argument", []string{"-model", model, "extra"}, `unexpected argument "extra"`},
		{"unknown flag", []string{"-model", model, "-bogus"}, "flag provided but not defined"},
		{"input not a number", []string{"-model", model, "-input", "1x3xbig"}, `-input "1x3xbig"`},
		{"input zero", []string{"-model", model, "-input", "0x3x8x8"}, "positive integers"},
		{"input empty size", []string{"-model", model, "-input", "1xx8"}, "positive integers"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(append([]string{"inspect"}, tt.args...), &stdout, &stderr)
			assert.Equal(t, 2, code)
			assert.Contains(t, stderr.String(), tt.want)
			assert.Empty(t, stdout.String())
		})
	}
}

func TestInspectJobErrors(t *testing.T) {
	model := testutil.Fixture(t, "root_conv")
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"missing model", []string{"-model", filepath.Join(t.TempDir(), "none.pt")}, "none.pt"},
		{"info for another model", []string{"-model", model, "-input", "1x64x8x8", "-info", testutil.AMCT("mixed", "decompose_info.json")}, "down"},
		{"wrong channels", []string{"-model", model, "-input", "1x3x8x8"}, "convsplit inspect: "},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(append([]string{"inspect"}, tt.args...), &stdout, &stderr)
			assert.Equal(t, 1, code)
			assert.Contains(t, stderr.String(), tt.want)
		})
	}
}

func TestParseShape(t *testing.T) {
	tests := []struct {
		text string
		want []int64
		ok   bool
	}{
		{"1x3x224x224", []int64{1, 3, 224, 224}, true},
		{"7", []int64{7}, true},
		{"", nil, false},
		{"1x-3", nil, false},
		{"1X3", nil, false},
		{"1x3x", nil, false},
	}
	for _, tt := range tests {
		got, err := parseShape(tt.text)
		if !tt.ok {
			assert.ErrorIs(t, err, errUsage, "input %q", tt.text)
			continue
		}
		require.NoError(t, err, "input %q", tt.text)
		assert.Equal(t, tt.want, got)
	}
}

func TestFormatCount(t *testing.T) {
	tests := []struct {
		n    int64
		want string
	}{
		{0, "0"}, {999, "999"}, {1000, "1K"}, {75497472, "75.5M"}, {452329472, "452M"}, {4089184256, "4.09G"},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, formatCount(tt.n), "count %d", tt.n)
	}
}
