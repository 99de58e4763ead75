package decompose

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"regexp"

	"github.com/convsplit/convsplit/torch"
)

// ErrUnsupportedLayer reports a Conv2d that convsplit cannot decompose, such
// as a traced layer whose forward graph it does not recognize.
var ErrUnsupportedLayer = errors.New("layer not supported")

// Change is one replaced layer: its name and the names of the two Conv2d
// layers of the Sequential that took its place.
type Change struct {
	Layer     string
	NewLayers [2]string
}

// Changes lists the replaced layers in file order.
type Changes []Change

// MarshalJSON writes the changes as AMCT's decompose_network returns them:
// one JSON object from each old name to the list of new names, in order,
// laid out as Python's json.dumps writes that dict.
func (c Changes) MarshalJSON() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, change := range c {
		if i > 0 {
			b.WriteString(", ")
		}
		key, err := json.Marshal(change.Layer)
		if err != nil {
			return nil, err
		}
		b.Write(key)
		b.WriteString(": [")
		for j, name := range change.NewLayers {
			if j > 0 {
				b.WriteString(", ")
			}
			quoted, err := json.Marshal(name)
			if err != nil {
				return nil, err
			}
			b.Write(quoted)
		}
		b.WriteByte(']')
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

// Network replaces every Conv2d listed in the information file at infoPath
// by a Sequential of two default-initialized Conv2d layers, as AMCT's
// decompose_network does, and returns the model and the changes in file
// order.
//
// The model changes in place and the returned module is model itself,
// except when the file lists the model itself (layer name ""): then model is
// left untouched and a new Sequential is returned. Layers that share a
// weight get new layers that share their new weights. Every check (the file,
// each layer's existence, type and geometry, and how its parents use it)
// runs before anything changes, so after an error the model is as it was.
// Errors wrap the sentinels of this package and name the file, the entry's
// layer and the field.
//
// New weights come from libtorch's default generator in AMCT's order: for
// each entry in file order, the first layer's weight, the last layer's
// weight, then its bias. After torch.ManualSeed(n) they equal what AMCT
// draws after torch.manual_seed(n).
func Network(model *torch.Module, infoPath string) (*torch.Module, Changes, error) {
	info, err := ReadInfo(infoPath)
	if err != nil {
		return nil, nil, err
	}
	return NetworkInfo(model, info, infoPath)
}

// NetworkInfo is Network with an information file already parsed; source
// names it in error messages.
func NetworkInfo(model *torch.Module, info *Info, source string) (*torch.Module, Changes, error) {
	layers, err := planLayers(model, info, source)
	if err != nil {
		return nil, nil, err
	}

	// The draws below advance torch's generator; a failure after them puts
	// it back, so that a failed call leaves no trace at all.
	generator, err := torch.SaveGeneratorState()
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", source, err)
	}
	defer generator.Close()
	succeeded := false
	defer func() {
		if succeeded {
			return
		}
		if err := generator.Restore(); err != nil {
			slog.Warn("the failed call's draws stay in the generator", "source", source, "error", err)
		}
	}()

	builder, err := torch.NewBuilder(model)
	if err != nil {
		return nil, nil, err
	}
	defer builder.Close()
	replacements, err := buildReplacements(builder, layers)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", source, err)
	}

	changes := make(Changes, len(layers))
	paths := make([]string, len(layers))
	for i, l := range layers {
		paths[i] = l.entry.Layer.Name
		changes[i] = Change{Layer: l.entry.Layer.Name, NewLayers: [2]string{joinName(paths[i], "0"), joinName(paths[i], "1")}}
	}

	if len(layers) == 1 && layers[0].entry.Layer.Name == "" {
		slog.Debug("decomposed the model itself", "source", source)
		succeeded = true
		return replacements[0], changes, nil
	}
	defer closeAll(replacements)
	if err := model.Replace(paths, replacements); err != nil {
		// Replace checks how the parents use each layer before it changes
		// anything, so its errors are layers the model cannot give up.
		return nil, nil, fmt.Errorf("%s: %w: %w", source, ErrUnsupportedLayer, err)
	}
	slog.Debug("decomposed layers", "source", source, "count", len(layers))
	succeeded = true
	return model, changes, nil
}

// plannedLayer is an entry checked against the model.
type plannedLayer struct {
	entry       Entry
	original    torch.Conv2d
	first, last ConvGeometry
	dtype       torch.DType
	// aliases are the forwardN methods a traced parent calls on the layer.
	aliases []string
	// weight and bias of the original layer, to find shared parameters.
	weight, bias *torch.Tensor
}

var forwardAlias = regexp.MustCompile(`^forward[0-9]+$`)

// planLayers runs every check that needs no change to the model.
func planLayers(model *torch.Module, info *Info, source string) ([]plannedLayer, error) {
	if err := info.Check(); err != nil {
		return nil, fmt.Errorf("%s: %w", source, err)
	}

	layers := make([]plannedLayer, 0, len(info.Entries))
	planned := false
	defer func() {
		if !planned {
			closeParameters(layers)
		}
	}()
	for i, e := range info.Entries {
		wrap := func(kind error, field, format string, args ...any) error {
			return &infoError{source: source, entry: i, layer: e.Layer.Name, hasName: true,
				field: field, detail: fmt.Sprintf(format, args...), kinds: []error{kind}}
		}
		if e.Layer.Name == "" && len(info.Entries) > 1 {
			return nil, wrap(ErrInvalidInfo, "ori_layer_info.name",
				"the model itself is listed together with %d other layers", len(info.Entries)-1)
		}
		layer, err := model.DescribeLayer(e.Layer.Name)
		if err != nil {
			return nil, err
		}
		if !layer.Found {
			return nil, wrap(ErrLayerNotFound, "ori_layer_info.name",
				"the model has no module of this name (a model frozen with torch.jit.freeze has no layers left)")
		}
		if !layer.Conv2d {
			return nil, wrap(ErrNotConv2d, "ori_layer_info.name", "the module is a %s (%s), not a torch.nn.Conv2d", layer.Class, layer.Type)
		}
		l, err := planLayer(layer, e)
		if err != nil {
			var ie *infoError
			if errors.As(err, &ie) {
				ie.source, ie.entry, ie.layer, ie.hasName = source, i, e.Layer.Name, true
				return nil, ie
			}
			return nil, wrap(ErrUnsupportedLayer, "", "%v", err)
		}
		layers = append(layers, l)
	}
	if err := checkSharing(layers, source); err != nil {
		return nil, err
	}
	planned = true
	return layers, nil
}

// planLayer checks one Conv2d against its entry and works out its new
// layers. It takes ownership of the layer's parameter handles.
func planLayer(layer torch.Layer, e Entry) (plannedLayer, error) {
	fail := func(err error) (plannedLayer, error) {
		layer.Weight.Close()
		layer.Bias.Close()
		return plannedLayer{}, err
	}
	if layer.GeometryError != "" {
		return fail(errors.New(layer.GeometryError))
	}
	conv := layer.Geometry
	dtype, err := torch.ParseDType(conv.DType)
	if err != nil {
		return fail(err)
	}
	orig := ConvGeometry{
		InChannels: conv.InChannels, OutChannels: conv.OutChannels,
		KernelSize: conv.KernelSize, Stride: conv.Stride, Padding: conv.Padding, Dilation: conv.Dilation,
		Groups: conv.Groups, PaddingMode: conv.PaddingMode, PaddingString: conv.PaddingString, Bias: conv.Bias,
	}
	first, last, err := e.SplitGeometry(orig)
	if err != nil {
		return fail(err)
	}
	if layer.Weight == nil {
		return fail(errors.New("the Conv2d has no weight"))
	}

	var aliases []string
	for _, name := range layer.Methods {
		if forwardAlias.MatchString(name) {
			aliases = append(aliases, name)
		}
	}
	bias := layer.Bias
	if !conv.Bias && bias != nil {
		bias.Close() // a traced layer may keep a bias its graph never reads
		bias = nil
	}
	return plannedLayer{entry: e, original: conv, first: first, last: last, dtype: dtype,
		aliases: aliases, weight: layer.Weight, bias: bias}, nil
}

// checkSharing rejects layers that share a weight but would get new weights
// of different shapes, which could not be shared.
func checkSharing(layers []plannedLayer, source string) error {
	for j := range layers {
		for i := 0; i < j; i++ {
			if !layers[j].weight.Same(layers[i].weight) {
				continue
			}
			a, b := layers[i].entry, layers[j].entry
			if a.FirstShape != b.FirstShape || a.LastShape != b.LastShape {
				return &infoError{source: source, entry: j, layer: b.Layer.Name, hasName: true,
					field: "decom_nodes", kinds: []error{ErrInconsistentShapes},
					detail: fmt.Sprintf("the layer shares its weight with %s, whose new shapes differ", displayName(a.Layer.Name))}
			}
		}
	}
	return nil
}

func closeParameters(layers []plannedLayer) {
	for _, l := range layers {
		l.weight.Close()
		l.bias.Close()
	}
}

func spec(g ConvGeometry, l plannedLayer) torch.Conv2dSpec {
	return torch.Conv2dSpec{
		InChannels: g.InChannels, OutChannels: g.OutChannels, Groups: g.Groups,
		KernelSize: g.KernelSize, Stride: g.Stride, Padding: g.Padding, Dilation: g.Dilation,
		PaddingMode: g.PaddingMode, PaddingString: g.PaddingString, Bias: g.Bias, DType: l.dtype,
		ChannelsLast: l.original.ChannelsLast, Training: l.original.Training,
	}
}

// buildReplacements makes the Sequential for each layer, drawing the new
// parameters in file order, then shares the new parameters of layers whose
// original parameters were shared. Every layer draws its own parameters
// first, as torch.nn.Conv2d's constructor does in AMCT, so that the
// generator advances exactly as there.
func buildReplacements(b *torch.Builder, layers []plannedLayer) ([]*torch.Module, error) {
	defer closeParameters(layers)
	pairs := make([][2]*torch.Module, len(layers))
	defer func() {
		for _, p := range pairs {
			p[0].Close()
			p[1].Close()
		}
	}()
	for i, l := range layers {
		first, err := b.Conv2d(spec(l.first, l))
		if err != nil {
			return nil, fmt.Errorf("layer %s: first layer: %w", displayName(l.entry.Layer.Name), err)
		}
		pairs[i][0] = first
		last, err := b.Conv2d(spec(l.last, l))
		if err != nil {
			return nil, fmt.Errorf("layer %s: last layer: %w", displayName(l.entry.Layer.Name), err)
		}
		pairs[i][1] = last
	}

	for j := range layers {
		for i := 0; i < j; i++ {
			if err := shareParameters(layers[i], layers[j], pairs[i], pairs[j]); err != nil {
				return nil, err
			}
		}
	}

	result := make([]*torch.Module, 0, len(layers))
	for i, l := range layers {
		seq, err := b.Sequential(pairs[i][:], l.aliases, l.original.Training)
		if err != nil {
			closeAll(result)
			return nil, fmt.Errorf("layer %s: %w", displayName(l.entry.Layer.Name), err)
		}
		result = append(result, seq)
	}
	return result, nil
}

// shareParameters gives layer b's new layers the parameters of layer a's
// when the original layers shared the corresponding parameter.
func shareParameters(a, b plannedLayer, newA, newB [2]*torch.Module) error {
	type shared struct {
		same        bool
		layer, name string
		index       int
	}
	links := []shared{
		{a.weight.Same(b.weight), "first", "weight", 0},
		{a.weight.Same(b.weight), "last", "weight", 1},
		{a.bias != nil && b.bias != nil && a.bias.Same(b.bias), "last", "bias", 1},
	}
	for _, link := range links {
		if !link.same {
			continue
		}
		t, err := newA[link.index].Parameter(link.name)
		if err != nil {
			return err
		}
		err = newB[link.index].SetParameter(link.name, t)
		t.Close()
		if err != nil {
			return fmt.Errorf("layer %s: sharing the %s layer's %s: %w", displayName(b.entry.Layer.Name), link.layer, link.name, err)
		}
	}
	return nil
}

func closeAll(modules []*torch.Module) {
	for _, m := range modules {
		m.Close()
	}
}

func joinName(parent, child string) string {
	if parent == "" {
		return child
	}
	return parent + "." + child
}
