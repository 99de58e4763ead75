package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/convsplit/convsplit/decompose"
	"github.com/convsplit/convsplit/torch"
)

// conv2dCost is one Conv2d layer of a model: its geometry, what AMCT's
// auto_decomposition rules decide for it, and its cost at one input size.
type conv2dCost struct {
	Name          string `json:"name"`
	InChannels    int    `json:"in_channels"`
	OutChannels   int    `json:"out_channels"`
	KernelSize    [2]int `json:"kernel_size"`
	Stride        [2]int `json:"stride"`
	Padding       [2]int `json:"padding"`
	PaddingString string `json:"padding_string,omitempty"`
	Dilation      [2]int `json:"dilation"`
	Groups        int    `json:"groups"`
	Bias          bool   `json:"bias"`
	// AMCTDecomposes, AMCTMode and AMCTReason are decompose.ChooseMode's result.
	AMCTDecomposes bool   `json:"amct_decomposes"`
	AMCTMode       string `json:"amct_mode,omitempty"`
	AMCTReason     string `json:"amct_reason,omitempty"`
	// Params counts the layer's weight and bias elements.
	Params int64 `json:"params"`
	// MACs are the multiply-accumulates of all the layer's calls for one
	// batch item: out_h*out_w*C_out*(C_in/groups)*kh*kw per call.
	MACs int64 `json:"macs"`
	// Calls counts the layer's calls in the forward pass.
	Calls int `json:"calls"`
	// Input and Output are the sizes of the first call's tensors.
	Input  []int64 `json:"input,omitempty"`
	Output []int64 `json:"output,omitempty"`
	// Measured is false when the layer's calls could not be recorded;
	// MACs is then 0 and Unmeasured gives the cause.
	Measured   bool   `json:"measured"`
	Unmeasured string `json:"unmeasured,omitempty"`
}

// modelCost is every Conv2d of a model with totals, at one input size.
type modelCost struct {
	Input  []int64      `json:"input"`
	DType  string       `json:"dtype"`
	Layers []conv2dCost `json:"layers"`
	// Conv2dParams sums the Conv2d layers' Params.
	Conv2dParams int64 `json:"conv2d_params"`
	// Params counts every parameter in the state dict. A tensor that two
	// layers share counts once per layer, as in the state dict.
	Params int64 `json:"params"`
	// MACs sums the Conv2d layers' MACs for one batch item. Other layers
	// (Linear, pooling) are not counted.
	MACs int64 `json:"macs"`
	// AMCTDecomposable counts the layers that AMCT's rules would decompose.
	AMCTDecomposable int `json:"amct_decomposable"`
	// Unmeasured counts the layers whose MACs are unknown.
	Unmeasured int `json:"unmeasured"`
}

// layerByName returns the layer called name, or nil.
func (c *modelCost) layerByName(name string) *conv2dCost {
	for i := range c.Layers {
		if c.Layers[i].Name == name {
			return &c.Layers[i]
		}
	}
	return nil
}

// measureModel reads every Conv2d of model and runs one forward pass on a
// zero input of the given sizes to record what each layer computes.
func measureModel(model *torch.Module, input []int64) (modelCost, error) {
	probe, err := model.ProbeConv2dShapes(input...)
	if err != nil {
		return modelCost{}, err
	}
	cost := modelCost{Input: input, DType: probe.DType}
	for _, shapes := range probe.Layers {
		layer, err := measureLayer(model, shapes)
		if err != nil {
			return modelCost{}, err
		}
		cost.Layers = append(cost.Layers, layer)
		cost.Conv2dParams += layer.Params
		cost.MACs += layer.MACs
		if layer.AMCTDecomposes {
			cost.AMCTDecomposable++
		}
		if !layer.Measured {
			cost.Unmeasured++
		}
	}
	if cost.Params, err = countParameters(model); err != nil {
		return modelCost{}, err
	}
	return cost, nil
}

func measureLayer(model *torch.Module, shapes torch.Conv2dShapes) (conv2dCost, error) {
	sub, err := model.Submodule(shapes.Name)
	if err != nil {
		return conv2dCost{}, err
	}
	defer sub.Close()
	g, err := sub.Conv2d()
	if err != nil {
		return conv2dCost{}, fmt.Errorf("layer %s: %w", displayLayer(shapes.Name), err)
	}
	layer := conv2dCost{
		Name: shapes.Name, InChannels: g.InChannels, OutChannels: g.OutChannels,
		KernelSize: g.KernelSize, Stride: g.Stride, Padding: g.Padding, PaddingString: g.PaddingString,
		Dilation: g.Dilation, Groups: g.Groups, Bias: g.Bias,
		Params: product(g.WeightShape), Calls: len(shapes.Calls), Measured: shapes.Probed,
	}
	if g.Bias {
		layer.Params += int64(g.OutChannels)
	}

	mode, ok, reason := decompose.ChooseMode(g.InChannels, g.OutChannels, g.KernelSize, g.Stride, g.Dilation, g.Groups)
	layer.AMCTDecomposes, layer.AMCTMode, layer.AMCTReason = ok, string(mode), reason

	if !shapes.Probed {
		layer.Unmeasured = shapes.Reason
		return layer, nil
	}
	if len(shapes.Calls) == 0 {
		layer.Unmeasured = "the forward pass did not call the layer"
		return layer, nil
	}
	layer.Input, layer.Output = shapes.Calls[0].Input, shapes.Calls[0].Output

	perOutput := int64(g.OutChannels) * int64(g.InChannels/max(g.Groups, 1)) * int64(g.KernelSize[0]*g.KernelSize[1])
	for _, call := range shapes.Calls {
		out := call.Output
		if len(out) < 2 {
			return conv2dCost{}, fmt.Errorf("layer %s: output sizes %v are not an image", displayLayer(shapes.Name), out)
		}
		layer.MACs += out[len(out)-2] * out[len(out)-1] * perOutput
	}
	return layer, nil
}

func product(sizes []int64) int64 {
	n := int64(1)
	for _, s := range sizes {
		n *= s
	}
	return n
}

func displayLayer(name string) string {
	if name == "" {
		return `""`
	}
	return name
}

// parseShape reads tensor sizes written as 1x3x224x224.
func parseShape(text string) ([]int64, error) {
	parts := strings.Split(text, "x")
	sizes := make([]int64, len(parts))
	for i, p := range parts {
		n, err := strconv.ParseInt(p, 10, 64)
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("%w: -input %q: sizes must be positive integers joined by x, such as 1x3x224x224", errUsage, text)
		}
		sizes[i] = n
	}
	return sizes, nil
}

func formatShape(sizes []int64) string {
	parts := make([]string, len(sizes))
	for i, s := range sizes {
		parts[i] = strconv.FormatInt(s, 10)
	}
	return strings.Join(parts, "x")
}

// defaultInput is (1, 3, 224, 224), with the first Conv2d's input channels
// in place of 3 when the model has a Conv2d.
func defaultInput(model *torch.Module) ([]int64, error) {
	modules, err := model.NamedModules()
	if err != nil {
		return nil, err
	}
	for _, m := range modules {
		if !m.Conv2d {
			continue
		}
		sub, err := model.Submodule(m.Name)
		if err != nil {
			return nil, err
		}
		g, err := sub.Conv2d()
		sub.Close()
		if err != nil {
			return nil, fmt.Errorf("layer %s: %w", displayLayer(m.Name), err)
		}
		return []int64{1, int64(g.InChannels), 224, 224}, nil
	}
	return []int64{1, 3, 224, 224}, nil
}

// formatCount writes a count with an SI suffix and three significant
// digits, such as 75.5M.
func formatCount(n int64) string {
	units := []struct {
		scale  float64
		suffix string
	}{{1e12, "T"}, {1e9, "G"}, {1e6, "M"}, {1e3, "K"}}
	for _, u := range units {
		if float64(n) >= u.scale {
			return strconv.FormatFloat(float64(n)/u.scale, 'g', 3, 64) + u.suffix
		}
	}
	return strconv.FormatInt(n, 10)
}

// formatRatio writes after/before as a percentage.
func formatRatio(before, after int64) string {
	if before == 0 {
		return "-"
	}
	return fmt.Sprintf("%.1f%%", 100*float64(after)/float64(before))
}

type inspectFlags struct {
	model, info string
	input       []int64
	json        bool
}

func parseInspectFlags(args []string, stderr io.Writer) (inspectFlags, error) {
	var f inspectFlags
	var input string
	fs := flag.NewFlagSet("inspect", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&f.model, "model", "", "TorchScript `file` to inspect (required)")
	fs.StringVar(&f.info, "info", "", "also restructure a copy as this AMCT decomposition-information `file` says and compare")
	fs.StringVar(&input, "input", "", "input `sizes` of the forward pass, such as 1x3x224x224 (default: 1, the first Conv2d's input channels, 224, 224)")
	fs.BoolVar(&f.json, "json", false, "print one JSON object instead of tables")

	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: convsplit inspect -model IN.pt [-info INFO.json] [-input 1x3x224x224] [-json]")
		fmt.Fprintln(stderr, "\nLists every Conv2d with its geometry, whether AMCT's auto_decomposition rules would")
		fmt.Fprintln(stderr, "decompose it and in which mode, its parameters and its multiply-accumulates (MACs) for")
		fmt.Fprintln(stderr, "one batch item, measured in a forward pass at the input size.")
		fs.PrintDefaults()
	}

	if err := parseFlagSet(fs, args); err != nil {
		return f, err
	}
	switch {
	case f.model == "":
		return f, fmt.Errorf("%w: -model is required", errUsage)
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

// replacedLayer compares one replaced layer with the two layers that took
// its place.
type replacedLayer struct {
	Name         string    `json:"name"`
	Mode         string    `json:"mode"`
	NewLayers    [2]string `json:"new_layers"`
	ParamsBefore int64     `json:"params_before"`
	ParamsAfter  int64     `json:"params_after"`
	MACsBefore   int64     `json:"macs_before"`
	MACsAfter    int64     `json:"macs_after"`
}

// inspectReport is the JSON output of convsplit inspect.
type inspectReport struct {
	Model    string          `json:"model"`
	Info     string          `json:"info,omitempty"`
	Before   modelCost       `json:"before"`
	After    *modelCost      `json:"after,omitempty"`
	Replaced []replacedLayer `json:"replaced,omitempty"`
}

func runInspect(args []string, stdout, stderr io.Writer) error {
	f, err := parseInspectFlags(args, stderr)
	if err != nil {
		return err
	}
	setupLogging(stderr, false)

	var info *decompose.Info
	if f.info != "" {
		if info, err = decompose.ReadInfo(f.info); err != nil {
			return err
		}
	}
	model, err := torch.Load(f.model)
	if err != nil {
		return err
	}
	defer model.Close()
	if f.input == nil {
		if f.input, err = defaultInput(model); err != nil {
			return err
		}
	}

	report := inspectReport{Model: f.model, Info: f.info}
	if report.Before, err = measureModel(model, f.input); err != nil {
		return err
	}
	if info != nil {
		after, replaced, err := measureRestructured(model, info, f.info, &report.Before)
		if err != nil {
			return err
		}
		report.After, report.Replaced = &after, replaced
	}

	if f.json {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(report)
	}
	printInspect(stdout, report)
	return nil
}

// measureRestructured restructures a copy of model as info specifies and
// measures it at the same input size as before.
func measureRestructured(model *torch.Module, info *decompose.Info, source string, before *modelCost) (modelCost, []replacedLayer, error) {
	clone, err := model.Clone()
	if err != nil {
		return modelCost{}, nil, err
	}
	defer clone.Close()
	result, changes, err := decompose.NetworkInfo(clone, info, source)
	if err != nil {
		return modelCost{}, nil, err
	}
	defer result.Close()
	after, err := measureModel(result, before.Input)
	if err != nil {
		return modelCost{}, nil, fmt.Errorf("measuring the restructured model: %w", err)
	}
	return after, compareReplaced(info, changes, before, &after), nil
}

func compareReplaced(info *decompose.Info, changes decompose.Changes, before, after *modelCost) []replacedLayer {
	var out []replacedLayer
	for i, c := range changes {
		r := replacedLayer{Name: c.Layer, Mode: string(info.Entries[i].Mode), NewLayers: c.NewLayers}
		if old := before.layerByName(c.Layer); old != nil {
			r.ParamsBefore, r.MACsBefore = old.Params, old.MACs
		}
		for _, name := range c.NewLayers {
			if l := after.layerByName(name); l != nil {
				r.ParamsAfter += l.Params
				r.MACsAfter += l.MACs
			}
		}
		out = append(out, r)
	}
	return out
}

func printInspect(w io.Writer, r inspectReport) {
	fmt.Fprintf(w, "model %s, input %s (%s)\n\n", r.Model, formatShape(r.Before.Input), r.Before.DType)
	printLayers(w, r.Before)
	if r.After == nil {
		return
	}
	fmt.Fprintf(w, "\nafter restructuring with %s (%d layers replaced)\n\n", r.Info, len(r.Replaced))
	printLayers(w, *r.After)

	fmt.Fprintln(w, "\nreplaced layers")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "LAYER\tMODE\tPARAMS BEFORE\tPARAMS AFTER\tRATIO\tMACS BEFORE\tMACS AFTER\tRATIO\t")
	for _, l := range r.Replaced {
		fmt.Fprintf(tw, "%s\t%s\t%d\t%d\t%s\t%s\t%s\t%s\t\n", displayLayer(l.Name), l.Mode, l.ParamsBefore, l.ParamsAfter,
			formatRatio(l.ParamsBefore, l.ParamsAfter), formatCount(l.MACsBefore), formatCount(l.MACsAfter), formatRatio(l.MACsBefore, l.MACsAfter))
	}
	tw.Flush()

	b, a := r.Before, *r.After
	fmt.Fprintln(w)
	fmt.Fprintf(w, "parameters in the state dict: %d before, %d after (%s)\n", b.Params, a.Params, formatRatio(b.Params, a.Params))
	fmt.Fprintf(w, "Conv2d MACs per batch item: %s before, %s after (%s)\n", formatCount(b.MACs), formatCount(a.MACs), formatRatio(b.MACs, a.MACs))
}

func printLayers(w io.Writer, c modelCost) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "LAYER\tIN\tOUT\tKERNEL\tSTRIDE\tPADDING\tDILATION\tGROUPS\tOUTPUT\tPARAMS\tMACS\tAMCT")
	for _, l := range c.Layers {
		padding := pairText(l.Padding)
		if l.PaddingString != "" {
			padding = l.PaddingString
		}
		output, macs := "-", "-"
		if l.Measured && l.Calls > 0 {
			output, macs = formatShape(l.Output), formatCount(l.MACs)
			if l.Calls > 1 {
				macs += fmt.Sprintf(" (%d calls)", l.Calls)
			}
		}
		amct := l.AMCTMode
		if !l.AMCTDecomposes {
			amct = "no: " + l.AMCTReason
		}
		fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%s\t%s\t%s\t%d\t%s\t%d\t%s\t%s\n", displayLayer(l.Name), l.InChannels, l.OutChannels,
			pairText(l.KernelSize), pairText(l.Stride), padding, pairText(l.Dilation), l.Groups, output, l.Params, macs, amct)
	}
	tw.Flush()

	fmt.Fprintf(w, "\n%d Conv2d layers, %d that AMCT's rules would decompose\n", len(c.Layers), c.AMCTDecomposable)
	fmt.Fprintf(w, "parameters: %d in Conv2d layers, %d in the state dict\n", c.Conv2dParams, c.Params)
	fmt.Fprintf(w, "Conv2d MACs per batch item: %s (%d)\n", formatCount(c.MACs), c.MACs)
	for _, l := range c.Layers {
		if l.Unmeasured != "" {
			fmt.Fprintf(w, "not measured, MACs not counted: %s: %s\n", displayLayer(l.Name), l.Unmeasured)
		}
	}
}

func pairText(p [2]int) string {
	return fmt.Sprintf("%dx%d", p[0], p[1])
}
