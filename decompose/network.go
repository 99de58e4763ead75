package decompose

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"regexp"
	"sync"

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
// left untouched and a new Sequential is returned, independent of model as
// a Clone is. Layers that share a weight get new layers that share their new
// weights. Every check (the file, each layer's existence, type and geometry,
// and how its parents use it) runs before anything changes, so after an
// error the model is as it was. Errors wrap the sentinels of this package
// and name the file, the entry's layer and the field.
//
// New weights come from libtorch's default generator in AMCT's order: for
// each entry in file order, the first layer's weight, the last layer's
// weight, then its bias. After torch.ManualSeed(n) they equal what AMCT
// draws after torch.manual_seed(n). The draws run on a second goroutine
// while Network builds the new types and checks the model.
//
// Concurrent calls on distinct models are safe. They draw one call after
// the other, so a failed call that rewinds the generator never undoes
// another call's draws. Other code drawing from libtorch's generator at the
// same time interleaves with the draws.
//
// NOTE: a call that fails after planning leaves the new layers' class types,
// unused, in the model's compilation unit. The model's modules, parameters
// and saved file stay as they were, but the next call's types get other
// mangled names (___torch_mangle_N) in the saved code.
func Network(model *torch.Module, infoPath string) (*torch.Module, Changes, error) {
	info, err := ReadInfo(infoPath)
	if err != nil {
		return nil, nil, err
	}
	return NetworkInfo(model, info, infoPath)
}

// drawLock serializes Network calls from generator save to commit or
// rewind, so each call's draws form one run of the generator's stream.
var drawLock sync.Mutex

// NetworkInfo is Network with an information file already parsed; source
// names it in error messages.
func NetworkInfo(model *torch.Module, info *Info, source string) (*torch.Module, Changes, error) {
	if info == nil {
		return nil, nil, fmt.Errorf("%s: %w: no information", source, ErrInvalidInfo)
	}
	if err := info.Check(); err != nil {
		return nil, nil, fmt.Errorf("%s: %w", source, err)
	}

	// The draws advance torch's generator, and a failure after them puts it
	// back so that a failed call leaves no trace at all. The lock keeps that
	// rewind from undoing the draws of a concurrent call.
	drawLock.Lock()
	defer drawLock.Unlock()
	generator, err := torch.SaveGeneratorState()
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", source, err)
	}
	defer generator.Close()

	// Each layer's weights are drawn on another goroutine as soon as the
	// layer is planned, while this one plans the rest, builds the new types
	// and checks the model. Replace changes the model only once every draw
	// is done.
	draws := newDrawer(len(info.Entries))
	succeeded := false
	defer func() {
		drawErr := draws.close()
		if succeeded && drawErr == nil {
			return
		}
		if err := generator.Restore(); err != nil {
			slog.Warn("the failed call's draws stay in the generator", "source", source, "error", err)
		}
	}()

	draws.start()
	layers, err := planLayers(model, info, source, draws)
	if err != nil {
		return nil, nil, err
	}

	builder, err := torch.NewBuilder(model)
	if err != nil {
		return nil, nil, err
	}
	defer builder.Close()
	replacements, err := buildReplacements(builder, layers, draws.queued)
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", source, err)
	}
	defer closeAll(replacements)

	changes := make(Changes, len(layers))
	paths := make([]string, len(layers))
	for i, l := range layers {
		paths[i] = l.entry.Layer.Name
		changes[i] = Change{Layer: l.entry.Layer.Name, NewLayers: [2]string{joinName(paths[i], "0"), joinName(paths[i], "1")}}
	}

	if len(layers) == 1 && layers[0].entry.Layer.Name == "" {
		if err := draws.wait(); err != nil {
			return nil, nil, fmt.Errorf("%s: %w", source, err)
		}
		// The new Sequential's types live in the model's compilation unit.
		// A copy has its own, so that the two can be used concurrently.
		root, err := replacements[0].Clone()
		if err != nil {
			return nil, nil, fmt.Errorf("%s: %w", source, err)
		}
		slog.Debug("decomposed the model itself", "source", source)
		succeeded = true
		return root, changes, nil
	}
	var drawErr error
	ready := func() error {
		drawErr = draws.wait()
		return drawErr
	}
	if err := model.ReplaceAfter(paths, replacements, ready); err != nil {
		if drawErr != nil {
			return nil, nil, fmt.Errorf("%s: drawing the new weights: %w", source, err)
		}
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

// planLayers runs every check that needs no change to the model, and
// queues each planned layer's new tensors on draws. info must be checked.
func planLayers(model *torch.Module, info *Info, source string, draws *drawer) ([]plannedLayer, error) {
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
		params, err := newLayerParameters(l)
		if err != nil {
			return nil, fmt.Errorf("%s: layer %s: %w", source, displayName(e.Layer.Name), err)
		}
		draws.add(params)
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

// buildReplacements makes the Sequential for each layer around the new
// tensors. A layer whose weight or bias is shared with an earlier listed layer
// takes that layer's new tensors, so the new layers share them as well. Its
// own draws then only advance the generator, as they do in AMCT.
func buildReplacements(b *torch.Builder, layers []plannedLayer, params []layerParameters) ([]*torch.Module, error) {
	defer closeParameters(layers)
	result := make([]*torch.Module, 0, len(layers))
	fail := func(err error) ([]*torch.Module, error) {
		closeAll(result)
		return nil, err
	}
	// used[j] are the tensors layer j's new layers hold.
	used := make([]layerParameters, len(layers))
	for j, l := range layers {
		used[j] = params[j]
		for i := 0; i < j; i++ {
			if layers[i].weight.Same(l.weight) {
				used[j].firstWeight, used[j].lastWeight = used[i].firstWeight, used[i].lastWeight
			}
			if layers[i].bias != nil && l.bias != nil && layers[i].bias.Same(l.bias) {
				used[j].lastBias = used[i].lastBias
			}
		}
		own := used[j]

		name := displayName(l.entry.Layer.Name)
		first, err := b.Conv2dWith(spec(l.first, l), own.firstWeight, nil)
		if err != nil {
			return fail(fmt.Errorf("layer %s: first layer: %w", name, err))
		}
		last, err := b.Conv2dWith(spec(l.last, l), own.lastWeight, own.lastBias)
		if err != nil {
			first.Close()
			return fail(fmt.Errorf("layer %s: last layer: %w", name, err))
		}
		seq, err := b.Sequential([]*torch.Module{first, last}, l.aliases, l.original.Training)
		first.Close()
		last.Close()
		if err != nil {
			return fail(fmt.Errorf("layer %s: %w", name, err))
		}
		result = append(result, seq)
	}
	return result, nil
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
