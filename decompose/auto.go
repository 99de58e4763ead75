package decompose

import (
	"errors"
	"fmt"
	"log/slog"
	"math"
	"time"

	"github.com/convsplit/convsplit/torch"
)

// ErrNonFiniteWeight reports a Conv2d weight with NaN or infinite values,
// which has no singular value decomposition.
var ErrNonFiniteWeight = errors.New("weight has NaN or infinite values")

// autoSource names Auto's information in the messages of NetworkInfo.
const autoSource = "auto decomposition"

// AutoOptions configures Auto. The zero value is ready to use.
type AutoOptions struct {
	// Logger receives a Debug record per layer, decomposed or left
	// unchanged with the reason. Warn records name the layers whose rank
	// estimate is 0 and those left unchanged because their dtype is not
	// supported or their geometry cannot be read. Nil means slog.Default().
	Logger *slog.Logger
	// Progress, when not nil, is called after each layer is decomposed with
	// the number of layers done, the number of layers to decompose and the
	// name of the layer just done.
	Progress func(done, total int, layer string)
}

// autoLayer is a Conv2d that Auto decomposes, with its factors once made.
type autoLayer struct {
	name   string
	conv   torch.Conv2d
	mode   Mode
	weight *torch.Tensor
	bias   *torch.Tensor
	// sharedWith is the index of an earlier layer with the same weight
	// tensor, whose factors this layer reuses, or -1.
	sharedWith int

	rows, cols, estimate, rank int
	first, last                *torch.Tensor
}

func (l *autoLayer) close() {
	l.weight.Close()
	l.bias.Close()
	// Factors of a layer that shares them are closed with the layer that
	// made them.
	if l.sharedWith < 0 {
		l.first.Close()
		l.last.Close()
	}
}

// Auto decomposes every eligible Conv2d of the model as AMCT's
// auto_decomposition does. It replaces each such layer by a Sequential of
// two Conv2d layers whose weights are a low-rank factorization of the trained
// weight. It returns the model, the changes in file order and the
// information that AMCT would write, which Info.WriteFile writes in AMCT's
// layout.
//
// ChooseMode decides which layers are eligible and their modes. Layers
// whose weight dtype is not float16, float32 or float64, and traced layers
// whose geometry torch.Module.Conv2d cannot read, are left unchanged with a
// warning. Each weight is unfolded into an L x M matrix A (see
// torch.ConvLowRank) and its rank is RoundRank(EstimateRank(s, L, M), L,
// min(C_in, C_out)) from the singular values s. The layer on the split
// channel's side gets the leading singular vectors U_r, the other the
// projection U_r^T A, and the last layer a copy of the original bias.
// Layers that share a weight are decomposed once and their new layers share
// the new weights.
//
// Like Network, Auto changes the model in place and returns it, except when
// the model itself is an eligible Conv2d: then the model is left untouched
// and a new Sequential is returned. Layers are visited in the order of
// Python's named_modules(), which is AMCT's file order.
//
// Auto builds the new layers with NetworkInfo, which draws their default
// initialization from libtorch's default generator before Auto sets the
// factors, so the generator advances as in Network. Every check and every
// factorization runs before the model changes, so after an error from them
// the model is as it was. A weight with NaN or infinite values gives an
// error that names the layer and wraps ErrNonFiniteWeight.
func Auto(model *torch.Module, opts AutoOptions) (*torch.Module, Changes, *Info, error) {
	logger := opts.Logger
	if logger == nil {
		logger = slog.Default()
	}

	layers, err := findAutoLayers(model, logger)
	if err != nil {
		return nil, nil, nil, err
	}
	defer func() {
		for i := range layers {
			layers[i].close()
		}
	}()

	for i := range layers {
		if err := factorLayer(layers, i, logger); err != nil {
			return nil, nil, nil, err
		}
		if opts.Progress != nil {
			opts.Progress(i+1, len(layers), layers[i].name)
		}
	}

	info := &Info{Entries: make([]Entry, len(layers))}
	for i, l := range layers {
		info.Entries[i] = autoEntry(l)
	}

	result, changes, err := NetworkInfo(model, info, autoSource)
	if err != nil {
		return nil, nil, nil, err
	}
	if err := setFactors(result, layers); err != nil {
		if !result.SameObject(model) {
			result.Close()
		}
		// NOTE: the model is already restructured here, and the layers not
		// yet set keep their default weights. The factors have the shapes
		// and dtypes of the new layers, so this path has not been seen to run.
		return nil, nil, nil, err
	}
	return result, changes, info, nil
}

// findAutoLayers lists the Conv2d layers to decompose in named_modules()
// order and takes their weights and biases.
func findAutoLayers(model *torch.Module, logger *slog.Logger) (layers []autoLayer, err error) {
	modules, err := model.NamedModules()
	if err != nil {
		return nil, err
	}
	defer func() {
		if err != nil {
			for i := range layers {
				layers[i].close()
			}
			layers = nil
		}
	}()

	for _, m := range modules {
		if !m.Conv2d {
			continue
		}
		l, ok, err := autoCandidate(model, m.Name, logger)
		if err != nil {
			return layers, fmt.Errorf("layer %s: %w", displayName(m.Name), err)
		}
		if !ok {
			continue
		}
		l.sharedWith = -1
		for j := range layers {
			if layers[j].weight.Same(l.weight) {
				l.sharedWith = j
				break
			}
		}
		layers = append(layers, l)
	}
	return layers, nil
}

// autoCandidate reads a Conv2d layer and reports whether Auto decomposes it.
func autoCandidate(model *torch.Module, name string, logger *slog.Logger) (autoLayer, bool, error) {
	sub, err := model.Submodule(name)
	if err != nil {
		return autoLayer{}, false, err
	}
	defer sub.Close()
	conv, err := sub.Conv2d()
	if err != nil {
		// A traced layer whose forward graph has a form the binding does not
		// recognize has no geometry to decompose with.
		logger.Warn("layer left unchanged: geometry not readable", "layer", name, "error", err)
		return autoLayer{}, false, nil
	}

	mode, ok, reason := ChooseMode(conv.InChannels, conv.OutChannels, conv.KernelSize, conv.Stride, conv.Dilation, conv.Groups)
	if !ok {
		logger.Debug("layer left unchanged", "layer", name, "reason", reason)
		return autoLayer{}, false, nil
	}
	dtype, err := torch.ParseDType(conv.DType)
	if err != nil || (dtype != torch.Float16 && dtype != torch.Float32 && dtype != torch.Float64) {
		logger.Warn("layer left unchanged: weight dtype not supported, want float16, float32 or float64",
			"layer", name, "dtype", conv.DType)
		return autoLayer{}, false, nil
	}

	l := autoLayer{name: name, conv: conv, mode: mode}
	if l.weight, err = sub.Parameter("weight"); err != nil {
		return autoLayer{}, false, err
	}
	if conv.Bias {
		if l.bias, err = sub.Parameter("bias"); err != nil {
			l.weight.Close()
			return autoLayer{}, false, err
		}
	}
	return l, true, nil
}

// factorLayer chooses the rank of layers[i] and makes its factors, or takes
// those of the earlier layer that shares its weight.
func factorLayer(layers []autoLayer, i int, logger *slog.Logger) error {
	l := &layers[i]
	if l.sharedWith >= 0 {
		source := layers[l.sharedWith]
		l.rows, l.cols, l.estimate, l.rank = source.rows, source.cols, source.estimate, source.rank
		l.first, l.last = source.first, source.last
		logger.Debug("layer shares its weight with a decomposed layer", "layer", l.name,
			"source", source.name, "mode", l.mode, "rank", l.rank)
		return nil
	}

	start := time.Now()
	finite, err := l.weight.AllFinite()
	if err != nil {
		return fmt.Errorf("layer %s: %w", displayName(l.name), err)
	}
	if !finite {
		return fmt.Errorf("layer %s: %w", displayName(l.name), ErrNonFiniteWeight)
	}

	axes := torch.ConvSplitAxes{Output: l.mode == FCFK || l.mode == FCSK, Width: l.mode == SCSK || l.mode == FCSK}
	factorization, err := torch.NewConvLowRank(l.weight, axes)
	if err != nil {
		return fmt.Errorf("layer %s: %w", displayName(l.name), err)
	}
	defer factorization.Close()
	l.rows, l.cols = factorization.Size()
	values, err := factorization.SingularValues()
	if err != nil {
		return fmt.Errorf("layer %s: %w", displayName(l.name), err)
	}
	l.estimate, err = EstimateRank(values, l.rows, l.cols)
	if err != nil {
		return fmt.Errorf("layer %s: rank estimate: %w", displayName(l.name), err)
	}
	l.rank = RoundRank(l.estimate, l.rows, min(l.conv.InChannels, l.conv.OutChannels))
	if l.estimate == 0 {
		logger.Warn("rank estimate is 0, so the layer gets the smallest rank the bounds allow",
			"layer", l.name, "rank", l.rank)
	}

	l.first, l.last, err = factorization.Factors(l.rank)
	if err != nil {
		return fmt.Errorf("layer %s: %w", displayName(l.name), err)
	}
	logger.Debug("decomposed layer", "layer", l.name, "mode", l.mode, "L", l.rows, "M", l.cols,
		"estimate", l.estimate, "rank", l.rank, "seconds", math.Round(time.Since(start).Seconds()*1000)/1000)
	return nil
}

// autoEntry returns the information-file entry of a factored layer.
func autoEntry(l autoLayer) Entry {
	e := Entry{
		Layer: LayerInfo{
			Name: l.name, InChannels: l.conv.InChannels, OutChannels: l.conv.OutChannels,
			KernelSize: l.conv.KernelSize, Stride: l.conv.Stride, Dilation: l.conv.Dilation,
			Groups: l.conv.Groups,
		},
		Mode: l.mode,
	}
	first, last := e.kernelShapes()
	e.FirstShape = [4]int{l.rank, l.conv.InChannels, first[0], first[1]}
	e.LastShape = [4]int{l.conv.OutChannels, l.rank, last[0], last[1]}
	return e
}

// setFactors gives the new layers of the restructured model the factors and
// copies of the original biases. Layers that shared a weight or a bias get
// the same tensors, so their new layers share them too.
func setFactors(result *torch.Module, layers []autoLayer) error {
	biasCopies := make([]*torch.Tensor, len(layers))
	defer func() {
		for _, b := range biasCopies {
			b.Close()
		}
	}()

	for i, l := range layers {
		var bias *torch.Tensor
		if l.bias != nil {
			for j := 0; j < i && bias == nil; j++ {
				if layers[j].bias != nil && layers[j].bias.Same(l.bias) {
					bias = biasCopies[j]
				}
			}
			if bias == nil {
				copied, err := l.bias.Clone()
				if err != nil {
					return fmt.Errorf("layer %s: copying the bias: %w", displayName(l.name), err)
				}
				biasCopies[i] = copied
				bias = copied
			}
		}

		parameters := []struct {
			child, name string
			tensor      *torch.Tensor
		}{
			{"0", "weight", l.first},
			{"1", "weight", l.last},
			{"1", "bias", bias},
		}
		for _, p := range parameters {
			if p.tensor == nil {
				continue
			}
			if err := setParameter(result, joinName(l.name, p.child), p.name, p.tensor); err != nil {
				return fmt.Errorf("layer %s: %w", displayName(l.name), err)
			}
		}
	}
	return nil
}

func setParameter(root *torch.Module, path, name string, t *torch.Tensor) error {
	sub, err := root.Submodule(path)
	if err != nil {
		return err
	}
	defer sub.Close()
	if err := sub.SetParameter(name, t); err != nil {
		return fmt.Errorf("%s.%s: %w", path, name, err)
	}
	return nil
}
