package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"time"

	"github.com/convsplit/convsplit/decompose"
	"github.com/convsplit/convsplit/torch"
)

type benchFlags struct {
	model, info, svg string
	input            []int64
	runs, warmup     int
	threads          int
	seed             int64
	seedSet, json    bool
}

func parseBenchFlags(args []string, stderr io.Writer) (benchFlags, error) {
	var f benchFlags
	var input string
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&f.model, "model", "", "TorchScript `file` to restructure (required)")
	fs.StringVar(&f.info, "info", "", "AMCT decomposition-information `file` (required)")
	fs.StringVar(&input, "input", "", "input `sizes` of the forward passes, such as 1x3x224x224 (default: 1, the first Conv2d's input channels, 224, 224)")
	fs.IntVar(&f.runs, "runs", 20, "timed forward passes of each model and each layer, before and after alternating, `N` >= 1")
	fs.IntVar(&f.warmup, "warmup", 3, "untimed forward passes before the timed ones, `N` >= 0")
	fs.IntVar(&f.threads, "threads", 0, "libtorch intra-op threads, `N` (default: libtorch's own choice)")
	fs.Int64Var(&f.seed, "seed", 0, "seed torch's generator with `N` before restructuring")
	fs.BoolVar(&f.json, "json", false, "print one JSON object instead of Markdown tables")
	fs.StringVar(&f.svg, "svg", "", "write a bar chart of each replaced layer's latency before and after to this SVG `file`")

	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: convsplit bench -model IN.pt -info INFO.json [-input 1x3x224x224] [-runs N] [-warmup N] [-threads N] [-json] [-svg PLOT.svg] [-seed N]")
		fmt.Fprintln(stderr, "\nTimes loading the model, restructuring it as AMCT's decompose_network would (and the")
		fmt.Fprintln(stderr, "weight draws within), saving it, and eval-mode forward passes of the whole model and of")
		fmt.Fprintln(stderr, "each replaced layer before and after. Times are in milliseconds.")
		fs.PrintDefaults()
	}

	if err := parseFlagSet(fs, args); err != nil {
		return f, err
	}
	fs.Visit(func(fl *flag.Flag) {
		if fl.Name == "seed" {
			f.seedSet = true
		}
	})

	switch {
	case f.model == "":
		return f, fmt.Errorf("%w: -model is required", errUsage)
	case f.info == "":
		return f, fmt.Errorf("%w: -info is required", errUsage)
	case f.runs < 1:
		return f, fmt.Errorf("%w: -runs must be at least 1, got %d", errUsage, f.runs)
	case f.warmup < 0:
		return f, fmt.Errorf("%w: -warmup must be non-negative, got %d", errUsage, f.warmup)
	case f.threads < 0:
		return f, fmt.Errorf("%w: -threads must be non-negative, got %d", errUsage, f.threads)
	case f.seed < 0:
		return f, fmt.Errorf("%w: -seed must be non-negative, got %d", errUsage, f.seed)
	}
	if input != "" {
		sizes, err := parseShape(input)
		if err != nil {
			return f, err
		}
		f.input = sizes
	}
	return f, nil
}

// latency summarizes the times of repeated forward passes in milliseconds.
type latency struct {
	Runs   int     `json:"runs"`
	Median float64 `json:"median_ms"`
	P90    float64 `json:"p90_ms"`
	Min    float64 `json:"min_ms"`
	Max    float64 `json:"max_ms"`
}

func summarize(times []time.Duration) latency {
	ms := make([]float64, len(times))
	for i, d := range times {
		ms[i] = float64(d) / float64(time.Millisecond)
	}
	slices.Sort(ms)
	n := len(ms)
	median := ms[n/2]
	if n%2 == 0 {
		median = (ms[n/2-1] + ms[n/2]) / 2
	}
	// p90 by the nearest-rank method.
	p90 := ms[int(math.Ceil(0.9*float64(n)))-1]
	return latency{Runs: n, Median: median, P90: p90, Min: ms[0], Max: ms[n-1]}
}

// benchLayer is one replaced layer: its cost and its latency alone.
type benchLayer struct {
	replacedLayer
	Input            []int64 `json:"input"`
	LatencyBefore    latency `json:"latency_before"`
	LatencyAfter     latency `json:"latency_after"`
	LatencyBeforeMs  float64 `json:"latency_before_ms"`
	LatencyAfterMs   float64 `json:"latency_after_ms"`
	MeasuredForward  bool    `json:"measured"`
	UnmeasuredReason string  `json:"unmeasured,omitempty"`
}

// benchReport is the JSON output of convsplit bench. Times are in
// milliseconds, MACs count Conv2d layers for one batch item.
type benchReport struct {
	Model   string  `json:"model"`
	Info    string  `json:"info"`
	Input   []int64 `json:"input"`
	DType   string  `json:"dtype"`
	Threads int     `json:"threads"`
	Runs    int     `json:"runs"`
	Warmup  int     `json:"warmup"`
	Seed    *int64  `json:"seed,omitempty"`

	LoadMs    float64 `json:"load_ms"`
	NetworkMs float64 `json:"network_ms"`
	DrawMs    float64 `json:"draw_ms"`
	SaveMs    float64 `json:"save_ms"`
	SavedSize int64   `json:"saved_bytes"`

	ParamsBefore int64 `json:"params_before"`
	ParamsAfter  int64 `json:"params_after"`
	MACsBefore   int64 `json:"macs_before"`
	MACsAfter    int64 `json:"macs_after"`

	LatencyBeforeMs float64 `json:"latency_before_ms"`
	LatencyAfterMs  float64 `json:"latency_after_ms"`
	LatencyBefore   latency `json:"latency_before"`
	LatencyAfter    latency `json:"latency_after"`

	Layers []benchLayer `json:"layers"`
}

func milliseconds(d time.Duration) float64 {
	return float64(d) / float64(time.Millisecond)
}

func runBench(args []string, stdout, stderr io.Writer) error {
	f, err := parseBenchFlags(args, stderr)
	if err != nil {
		return err
	}
	setupLogging(stderr, false)
	if f.threads > 0 {
		if err := torch.SetNumThreads(f.threads); err != nil {
			return err
		}
	}
	info, err := decompose.ReadInfo(f.info)
	if err != nil {
		return err
	}

	report := benchReport{Model: f.model, Info: f.info, Threads: torch.NumThreads(), Runs: f.runs, Warmup: f.warmup}
	start := time.Now()
	model, err := torch.Load(f.model)
	if err != nil {
		return err
	}
	report.LoadMs = milliseconds(time.Since(start))
	defer model.Close()

	if f.input == nil {
		if f.input, err = defaultInput(model); err != nil {
			return err
		}
	}
	report.Input = f.input
	before, err := measureModel(model, f.input)
	if err != nil {
		return err
	}
	report.DType = before.DType

	result, changes, err := timeNetwork(model, f, &report)
	if err != nil {
		return err
	}
	defer result.Close()
	draw, err := timeDraws(model, info)
	if err != nil {
		return fmt.Errorf("timing the weight draws: %w", err)
	}
	report.DrawMs = milliseconds(draw)
	if err := timeSave(result, &report); err != nil {
		return err
	}

	after, err := measureModel(result, f.input)
	if err != nil {
		return fmt.Errorf("measuring the restructured model: %w", err)
	}
	report.ParamsBefore, report.ParamsAfter = before.Params, after.Params
	report.MACsBefore, report.MACsAfter = before.MACs, after.MACs

	if err := timeModels(model, result, f, &report); err != nil {
		return err
	}
	for _, r := range compareReplaced(info, changes, &before, &after) {
		layer, err := timeLayer(model, result, r, &before, f)
		if err != nil {
			return err
		}
		report.Layers = append(report.Layers, layer)
	}

	if f.svg != "" {
		if err := writeSVGFile(f.svg, report); err != nil {
			return err
		}
	}
	if f.json {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(report)
	}
	printBench(stdout, report)
	return nil
}

// timeNetwork restructures a copy of model with decompose.Network and times
// that call alone: the copy is made first, and Network reads the
// information file itself, as AMCT's decompose_network does.
func timeNetwork(model *torch.Module, f benchFlags, report *benchReport) (*torch.Module, decompose.Changes, error) {
	clone, err := model.Clone()
	if err != nil {
		return nil, nil, err
	}
	if f.seedSet {
		torch.ManualSeed(uint64(f.seed))
		report.Seed = &f.seed
	}
	start := time.Now()
	result, changes, err := decompose.Network(clone, f.info)
	elapsed := time.Since(start)
	if err != nil {
		clone.Close()
		return nil, nil, err
	}
	if result != clone {
		clone.Close()
	}
	report.NetworkMs = milliseconds(elapsed)
	return result, changes, nil
}

// drawPasses is how many timed passes timeDraws makes; it returns the median.
const drawPasses = 3

// timeDraws times the weight draws of Network alone: the same new tensors,
// allocated and drawn one after the other on this goroutine. Network draws
// them on a second goroutine while it builds the new types and checks the
// model, so its time is the draws plus whatever does not overlap them. The
// draws advance libtorch's generator, so call it after Network.
func timeDraws(model *torch.Module, info *decompose.Info) (time.Duration, error) {
	specs, err := newLayerSpecs(model, info)
	if err != nil {
		return 0, err
	}

	pass := func() (time.Duration, error) {
		var tensors []*torch.Tensor
		defer func() {
			for _, t := range tensors {
				t.Close()
			}
		}()
		start := time.Now()
		for _, spec := range specs {
			weight, bias, err := torch.NewConv2dParameters(spec)
			if err != nil {
				return 0, err
			}
			tensors = append(tensors, weight, bias)
			if err := torch.DrawConv2dParameters(weight, bias); err != nil {
				return 0, err
			}
		}
		return time.Since(start), nil
	}
	times := make([]time.Duration, drawPasses)
	for i := range times {
		if times[i], err = pass(); err != nil {
			return 0, err
		}
	}
	slices.Sort(times)
	return times[len(times)/2], nil
}

// newLayerSpecs returns, in Network's order, the specs of the first and
// last new layer of each entry: the geometry of Entry.SplitGeometry, the
// original weight's dtype and memory format, and the original's training
// flag.
func newLayerSpecs(model *torch.Module, info *decompose.Info) ([]torch.Conv2dSpec, error) {
	var specs []torch.Conv2dSpec
	for _, e := range info.Entries {
		sub, err := model.Submodule(e.Layer.Name)
		if err != nil {
			return nil, err
		}
		g, err := sub.Conv2d()
		sub.Close()
		if err != nil {
			return nil, err
		}
		dtype, err := torch.ParseDType(g.DType)
		if err != nil {
			return nil, err
		}
		orig := decompose.ConvGeometry{
			InChannels: g.InChannels, OutChannels: g.OutChannels, KernelSize: g.KernelSize, Stride: g.Stride,
			Padding: g.Padding, Dilation: g.Dilation, Groups: g.Groups, PaddingMode: g.PaddingMode, Bias: g.Bias,
		}
		first, last, err := e.SplitGeometry(orig)
		if err != nil {
			return nil, err
		}
		for _, n := range []decompose.ConvGeometry{first, last} {
			specs = append(specs, torch.Conv2dSpec{
				InChannels: n.InChannels, OutChannels: n.OutChannels, Groups: n.Groups,
				KernelSize: n.KernelSize, Stride: n.Stride, Padding: n.Padding, Dilation: n.Dilation,
				PaddingMode: n.PaddingMode, Bias: n.Bias, DType: dtype,
				ChannelsLast: g.ChannelsLast, Training: g.Training,
			})
		}
	}
	return specs, nil
}

// timeSave saves the restructured model to a temporary file, which
// Module.Save writes, syncs to disk and renames, and removes it afterwards.
func timeSave(result *torch.Module, report *benchReport) error {
	dir, err := os.MkdirTemp("", "convsplit-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "restructured.pt")
	start := time.Now()
	if err := result.Save(path); err != nil {
		return err
	}
	report.SaveMs = milliseconds(time.Since(start))
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	report.SavedSize = st.Size()
	return nil
}

// randomInput returns a tensor of the given sizes with values uniform in
// [-1, 1) from a fixed seed, in the dtype the shape probe used.
func randomInput(sizes []int64, dtype string) (*torch.Tensor, error) {
	rng := rand.New(rand.NewPCG(1, 2))
	n := product(sizes)
	switch dtype {
	case "Float":
		data := make([]float32, n)
		for i := range data {
			data[i] = float32(2*rng.Float64() - 1)
		}
		return torch.FromFloat32(data, sizes...)
	case "Double":
		data := make([]float64, n)
		for i := range data {
			data[i] = 2*rng.Float64() - 1
		}
		return torch.FromFloat64(data, sizes...)
	}
	return nil, fmt.Errorf("forward passes with %s inputs are not supported; bench supports float32 and float64 models", dtype)
}

// forwardOnce times one forward pass of m.
func forwardOnce(m *torch.Module, input *torch.Tensor) (time.Duration, error) {
	start := time.Now()
	outputs, err := m.Forward(input)
	elapsed := time.Since(start)
	for _, o := range outputs {
		o.Close()
	}
	return elapsed, err
}

// timeForwardPair times the forward passes of before and after on the same
// input: warmup untimed passes of each, then runs timed passes of each,
// alternating, so that a change in the machine's load reaches both sides
// alike.
func timeForwardPair(before, after *torch.Module, input *torch.Tensor, warmup, runs int) (latency, latency, error) {
	modules := [2]*torch.Module{before, after}
	for i := 0; i < warmup; i++ {
		for _, m := range modules {
			if _, err := forwardOnce(m, input); err != nil {
				return latency{}, latency{}, err
			}
		}
	}
	var times [2][]time.Duration
	for i := 0; i < runs; i++ {
		for side, m := range modules {
			elapsed, err := forwardOnce(m, input)
			if err != nil {
				return latency{}, latency{}, err
			}
			times[side] = append(times[side], elapsed)
		}
	}
	return summarize(times[0]), summarize(times[1]), nil
}

// timeModels times eval-mode forward passes of the original and the
// restructured model on the same input.
func timeModels(model, result *torch.Module, f benchFlags, report *benchReport) error {
	input, err := randomInput(f.input, report.DType)
	if err != nil {
		return err
	}
	defer input.Close()
	for _, m := range []*torch.Module{model, result} {
		if err := m.Eval(); err != nil {
			return err
		}
	}
	report.LatencyBefore, report.LatencyAfter, err = timeForwardPair(model, result, input, f.warmup, f.runs)
	if err != nil {
		return fmt.Errorf("forward passes of the models: %w", err)
	}
	report.LatencyBeforeMs, report.LatencyAfterMs = report.LatencyBefore.Median, report.LatencyAfter.Median
	return nil
}

// timeLayer times one replaced layer alone, before and after, on an input
// of the sizes its first call had in the forward pass.
func timeLayer(model, result *torch.Module, r replacedLayer, before *modelCost, f benchFlags) (benchLayer, error) {
	layer := benchLayer{replacedLayer: r}
	original := before.layerByName(r.Name)
	if original == nil || len(original.Input) == 0 {
		layer.UnmeasuredReason = "no input sizes recorded for the layer"
		if original != nil && original.Unmeasured != "" {
			layer.UnmeasuredReason = original.Unmeasured
		}
		return layer, nil
	}
	layer.Input = original.Input
	input, err := randomInput(original.Input, before.DType)
	if err != nil {
		return layer, err
	}
	defer input.Close()

	oldLayer, err := model.Submodule(r.Name)
	if err != nil {
		return layer, err
	}
	defer oldLayer.Close()
	newLayer, err := result.Submodule(r.Name)
	if err != nil {
		return layer, err
	}
	defer newLayer.Close()
	layer.LatencyBefore, layer.LatencyAfter, err = timeForwardPair(oldLayer, newLayer, input, f.warmup, f.runs)
	if err != nil {
		return layer, fmt.Errorf("layer %s: %w", displayLayer(r.Name), err)
	}
	layer.LatencyBeforeMs, layer.LatencyAfterMs = layer.LatencyBefore.Median, layer.LatencyAfter.Median
	layer.MeasuredForward = true
	return layer, nil
}

func printBench(w io.Writer, r benchReport) {
	fmt.Fprintf(w, "model %s, information file %s\n\n", r.Model, r.Info)
	fmt.Fprintf(w, "input %s (%s), %d intra-op threads (at::get_num_threads), %d timed runs after %d warm-up runs, alternating before and after\n\n",
		formatShape(r.Input), r.DType, r.Threads, r.Runs, r.Warmup)

	fmt.Fprintln(w, "| step | ms |")
	fmt.Fprintln(w, "| --- | ---: |")
	fmt.Fprintf(w, "| load | %.1f |\n", r.LoadMs)
	fmt.Fprintf(w, "| restructure (decompose.Network, %d layers) | %.2f |\n", len(r.Layers), r.NetworkMs)
	fmt.Fprintf(w, "| weight draws alone, which Network overlaps with its other work | %.2f |\n", r.DrawMs)
	fmt.Fprintf(w, "| save (%s bytes) | %.1f |\n", formatCount(r.SavedSize), r.SaveMs)
	fmt.Fprintln(w)

	fmt.Fprintln(w, "| | before | after | after/before |")
	fmt.Fprintln(w, "| --- | ---: | ---: | ---: |")
	fmt.Fprintf(w, "| parameters | %d | %d | %s |\n", r.ParamsBefore, r.ParamsAfter, formatRatio(r.ParamsBefore, r.ParamsAfter))
	fmt.Fprintf(w, "| Conv2d MACs per batch item | %s | %s | %s |\n", formatCount(r.MACsBefore), formatCount(r.MACsAfter), formatRatio(r.MACsBefore, r.MACsAfter))
	b, a := r.LatencyBefore, r.LatencyAfter
	fmt.Fprintf(w, "| forward median (ms) | %.2f | %.2f | %s |\n", b.Median, a.Median, timeRatio(b.Median, a.Median))
	fmt.Fprintf(w, "| forward p90 (ms) | %.2f | %.2f | %s |\n", b.P90, a.P90, timeRatio(b.P90, a.P90))
	fmt.Fprintf(w, "| forward min to max (ms) | %.2f to %.2f | %.2f to %.2f | |\n", b.Min, b.Max, a.Min, a.Max)
	fmt.Fprintln(w)

	fmt.Fprintln(w, "| layer | mode | input | params before | params after | MACs before | MACs after | ms before | ms after | after/before |")
	fmt.Fprintln(w, "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
	for _, l := range r.Layers {
		timesText := "| - | - | - |"
		if l.MeasuredForward {
			timesText = fmt.Sprintf("| %.3f | %.3f | %s |", l.LatencyBeforeMs, l.LatencyAfterMs, timeRatio(l.LatencyBeforeMs, l.LatencyAfterMs))
		}
		fmt.Fprintf(w, "| %s | %s | %s | %d | %d | %s | %s %s\n", displayLayer(l.Name), l.Mode, formatShape(l.Input),
			l.ParamsBefore, l.ParamsAfter, formatCount(l.MACsBefore), formatCount(l.MACsAfter), timesText)
	}
	for _, l := range r.Layers {
		if !l.MeasuredForward {
			fmt.Fprintf(w, "\nlayer %s not timed: %s\n", displayLayer(l.Name), l.UnmeasuredReason)
		}
	}
}

func timeRatio(before, after float64) string {
	if before <= 0 {
		return "-"
	}
	return fmt.Sprintf("%.2fx", after/before)
}
