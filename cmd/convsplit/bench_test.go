package main

import (
	"bytes"
	"encoding/json"
	"encoding/xml"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/convsplit/convsplit/internal/testutil"
)

func runBenchCommand(t *testing.T, args ...string) (stdout, stderr string) {
	t.Helper()
	var out, errOut bytes.Buffer
	code := run(append([]string{"bench"}, args...), &out, &errOut)
	require.Equal(t, 0, code, "stderr: %s", errOut.String())
	return out.String(), errOut.String()
}

func mixedBenchArgs(t *testing.T, extra ...string) []string {
	return append([]string{"-model", testutil.Fixture(t, "mixed"), "-info", testutil.AMCT("mixed", "decompose_info.json"),
		"-input", "1x3x16x16", "-runs", "3", "-warmup", "1"}, extra...)
}

func assertLatency(t *testing.T, l latency, runs int, label string) {
	t.Helper()
	assert.Equal(t, runs, l.Runs, label)
	assert.Positive(t, l.Min, label)
	assert.LessOrEqual(t, l.Min, l.Median, label)
	assert.LessOrEqual(t, l.Median, l.P90, label)
	assert.LessOrEqual(t, l.P90, l.Max, label)
}

func TestBenchJSON(t *testing.T) {
	stdout, _ := runBenchCommand(t, mixedBenchArgs(t, "-json", "-seed", "3")...)

	var keys map[string]json.RawMessage
	require.NoError(t, json.Unmarshal([]byte(stdout), &keys))
	for _, key := range []string{"load_ms", "network_ms", "draw_ms", "save_ms", "params_before", "params_after",
		"macs_before", "macs_after", "latency_before_ms", "latency_after_ms", "layers", "threads", "input", "seed"} {
		assert.Contains(t, keys, key)
	}

	var r benchReport
	require.NoError(t, json.Unmarshal([]byte(stdout), &r))
	for name, ms := range map[string]float64{"load": r.LoadMs, "network": r.NetworkMs, "draw": r.DrawMs, "save": r.SaveMs} {
		assert.Positive(t, ms, name)
		assert.Less(t, ms, float64(time.Minute/time.Millisecond), name)
	}
	assert.Equal(t, []int64{1, 3, 16, 16}, r.Input)
	assert.Positive(t, r.Threads)
	assert.Positive(t, r.SavedSize)
	assert.Equal(t, int64(1814752), r.ParamsBefore)
	assert.Equal(t, int64(556256), r.ParamsAfter)
	assert.Less(t, r.MACsAfter, r.MACsBefore)
	assert.Positive(t, r.MACsAfter)
	assertLatency(t, r.LatencyBefore, 3, "model before")
	assertLatency(t, r.LatencyAfter, 3, "model after")
	assert.Equal(t, r.LatencyBefore.Median, r.LatencyBeforeMs)
	assert.Equal(t, r.LatencyAfter.Median, r.LatencyAfterMs)

	names := make([]string, len(r.Layers))
	for i, l := range r.Layers {
		names[i] = l.Name
		assert.True(t, l.MeasuredForward, "layer %s: %s", l.Name, l.UnmeasuredReason)
		assertLatency(t, l.LatencyBefore, 3, l.Name+" before")
		assertLatency(t, l.LatencyAfter, 3, l.Name+" after")
		assert.Less(t, l.ParamsAfter, l.ParamsBefore, l.Name)
		assert.Less(t, l.MACsAfter, l.MACsBefore, l.Name)
	}
	assert.Equal(t, []string{"down", "tall", "squeeze", "blocks.0", "blocks.1", "tail.0.1"}, names)
	assert.Equal(t, []int64{1, 128, 16, 16}, r.Layers[0].Input, "input of down, after stem")
}

func TestBenchMarkdown(t *testing.T) {
	stdout, _ := runBenchCommand(t, mixedBenchArgs(t)...)
	for _, part := range []string{
		"intra-op threads (at::get_num_threads), 3 timed runs after 1 warm-up runs",
		"| load |", "| restructure (decompose.Network, 6 layers) |", "| weight draws alone, which Network overlaps with its other work |", "| save (",
		"| parameters | 1814752 | 556256 | 30.7% |", "| forward median (ms) |",
		"| down | SCFK | 1x128x16x16 | 294912 | 73728 |",
	} {
		assert.Contains(t, stdout, part)
	}
}

// svgNode is any element of an SVG document, with its children.
type svgNode struct {
	XMLName  xml.Name
	Attrs    []xml.Attr `xml:",any,attr"`
	Text     string     `xml:",chardata"`
	Children []svgNode  `xml:",any"`
}

func (n svgNode) attr(name string) string {
	for _, a := range n.Attrs {
		if a.Name.Local == name {
			return a.Value
		}
	}
	return ""
}

func (n svgNode) walk(visit func(svgNode)) {
	visit(n)
	for _, c := range n.Children {
		c.walk(visit)
	}
}

func TestBenchSVG(t *testing.T) {
	path := filepath.Join(t.TempDir(), "latency.svg")
	runBenchCommand(t, mixedBenchArgs(t, "-svg", path)...)

	data, err := os.ReadFile(path)
	require.NoError(t, err)
	dec := xml.NewDecoder(bytes.NewReader(data))
	var root svgNode
	require.NoError(t, dec.Decode(&root), "the chart must be well-formed XML")
	for {
		token, err := dec.Token()
		if err != nil {
			assert.ErrorIs(t, err, io.EOF)
			break
		}
		text, isText := token.(xml.CharData)
		assert.True(t, isText && strings.TrimSpace(string(text)) == "", "only white space may follow the svg element, got %#v", token)
	}
	assert.Equal(t, "svg", root.XMLName.Local)
	assert.Equal(t, "http://www.w3.org/2000/svg", root.XMLName.Space)
	assert.NotEmpty(t, root.attr("viewBox"))

	var texts []string
	bars := map[string]int{}
	root.walk(func(n svgNode) {
		switch n.XMLName.Local {
		case "text":
			texts = append(texts, strings.TrimSpace(n.Text))
		case "rect":
			if n.attr("height") == "11.0" {
				bars[n.attr("fill")]++
			}
		}
	})
	for _, want := range []string{"down", "tall", "squeeze", "blocks.0", "blocks.1", "tail.0.1",
		"median forward latency (ms)", "before: original Conv2d", "after: Sequential of two Conv2d"} {
		assert.Contains(t, texts, want)
	}
	assert.Equal(t, map[string]int{beforeColor: 6, afterColor: 6}, bars, "one bar per layer before and after")
}

func TestBenchUsageErrors(t *testing.T) {
	model := testutil.Fixture(t, "root_conv")
	info := testutil.AMCT("root_conv", "decompose_info.json")
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no model", []string{"-info", info}, "-model is required"},
		{"no info", []string{"-model", model}, "-info is required"},
		{"zero runs", []string{"-model", model, "-info", info, "-runs", "0"}, "-runs must be at least 1"},
		{"negative warm-up", []string{"-model", model, "-info", info, "-warmup", "-1"}, "-warmup must be non-negative"},
		{"negative threads", []string{"-model", model, "-info", info, "-threads", "-2"}, "-threads must be non-negative"},
		{"negative seed", []string{"-model", model, "-info", info, "-seed", "-1"}, "-seed must be non-negative"},
		{"bad input", []string{"-model", model, "-info", info, "-input", "1x64x"}, "positive integers"},
		{"extra argument", []string{"-model", model, "-info", info, "more"}, `unexpected argument "more"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			code := run(append([]string{"bench"}, tt.args...), &stdout, &stderr)
			assert.Equal(t, 2, code)
			assert.Contains(t, stderr.String(), tt.want)
			assert.Empty(t, stdout.String())
		})
	}
}

func TestBenchRootConv(t *testing.T) {
	stdout, _ := runBenchCommand(t, "-model", testutil.Fixture(t, "root_conv"), "-info", testutil.AMCT("root_conv", "decompose_info.json"),
		"-input", "1x64x8x8", "-runs", "1", "-warmup", "0", "-json")
	var r benchReport
	require.NoError(t, json.Unmarshal([]byte(stdout), &r))
	require.Len(t, r.Layers, 1)
	assert.Equal(t, "", r.Layers[0].Name)
	assert.True(t, r.Layers[0].MeasuredForward, r.Layers[0].UnmeasuredReason)
	assert.Equal(t, [2]string{"0", "1"}, r.Layers[0].NewLayers)
	assert.Less(t, r.ParamsAfter, r.ParamsBefore)
}

func TestSummarize(t *testing.T) {
	ms := func(values ...float64) []time.Duration {
		out := make([]time.Duration, len(values))
		for i, v := range values {
			out[i] = time.Duration(v * float64(time.Millisecond))
		}
		return out
	}
	tests := []struct {
		name  string
		times []time.Duration
		want  latency
	}{
		{"one run", ms(4), latency{Runs: 1, Median: 4, P90: 4, Min: 4, Max: 4}},
		{"odd count", ms(5, 1, 3), latency{Runs: 3, Median: 3, P90: 5, Min: 1, Max: 5}},
		{"even count", ms(4, 1, 3, 2), latency{Runs: 4, Median: 2.5, P90: 4, Min: 1, Max: 4}},
		{"ten runs", ms(10, 9, 8, 7, 6, 5, 4, 3, 2, 1), latency{Runs: 10, Median: 5.5, P90: 9, Min: 1, Max: 10}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			assert.Equal(t, tt.want, summarize(tt.times))
		})
	}
}

func TestNiceTicks(t *testing.T) {
	tests := []struct {
		max, step, top float64
	}{
		{0, 1, 1}, {8.87, 2, 10}, {0.3, 0.05, 0.3}, {123, 20, 140}, {1, 0.2, 1},
	}
	for _, tt := range tests {
		step, top := niceTicks(tt.max)
		assert.InDelta(t, tt.step, step, 1e-12, "step for %v", tt.max)
		assert.InDelta(t, tt.top, top, 1e-9, "top for %v", tt.max)
	}
}

func TestFormatMs(t *testing.T) {
	tests := []struct {
		ms   float64
		want string
	}{
		{9.9999, "10"}, {9.82, "9.82"}, {35.43, "35.4"}, {0.0483, "0.0483"}, {123.4, "123"}, {1500, "1500"},
	}
	for _, tt := range tests {
		assert.Equal(t, tt.want, formatMs(tt.ms), "latency %v", tt.ms)
	}
}
