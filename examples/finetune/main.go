// Command finetune restructures a TorchScript model with an AMCT
// decomposition-information file and loads the decomposed weights AMCT
// computed. It then fine-tunes the result for a few SGD steps so that it
// matches the original model's outputs on random inputs (the original is the
// teacher). It prints the loss of each step and saves the model as
// TorchScript and its weights as a state dict that Python's load_state_dict
// reads.
//
// From the repository root, after `make fixtures`:
//
//	go run ./examples/finetune
//
// For the lowrank model, whose planted weights make outputs near 1e7 and
// gradients huge, pass a tiny learning rate:
//
//	go run ./examples/finetune -model build/fixtures/lowrank.pt \
//	    -info testdata/amct/lowrank/decompose_info.json \
//	    -weights testdata/amct/lowrank/decomposed_state.pt -input 2,256,16,16 -lr 3e-15
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/convsplit/convsplit/decompose"
	"github.com/convsplit/convsplit/torch"
)

type options struct {
	model, info, weights string
	out, state           string
	input                []int64
	steps                int
	seed                 int64
	sgd                  torch.SGDOptions
}

func parseFlags(args []string, stderr io.Writer) (options, error) {
	var o options
	var input string
	fs := flag.NewFlagSet("finetune", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&o.model, "model", "build/fixtures/mixed.pt", "TorchScript `file` of the original model")
	fs.StringVar(&o.info, "info", "testdata/amct/mixed/decompose_info.json", "AMCT decomposition-information `file`")
	fs.StringVar(&o.weights, "weights", "testdata/amct/mixed/decomposed_state.pt", "state dict `file` with the decomposed weights")
	fs.StringVar(&input, "input", "2,3,32,32", "comma-separated `shape` of a batch of random inputs")
	fs.IntVar(&o.steps, "steps", 10, "number of SGD `steps`")
	fs.Float64Var(&o.sgd.LR, "lr", 0.1, "learning `rate`")
	fs.Float64Var(&o.sgd.Momentum, "momentum", 0.9, "momentum `factor`")
	fs.Float64Var(&o.sgd.WeightDecay, "weight-decay", 0, "L2 penalty `factor`")
	fs.Int64Var(&o.seed, "seed", 1, "`seed` of the random inputs")
	fs.StringVar(&o.out, "o", "build/finetune/model.pt", "output TorchScript `file`")
	fs.StringVar(&o.state, "state", "build/finetune/state.pt", "output state dict `file`")

	if err := fs.Parse(args); err != nil {
		return o, err
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	if o.steps < 1 {
		return o, fmt.Errorf("-steps must be at least 1, got %d", o.steps)
	}

	for _, field := range strings.Split(input, ",") {
		n, err := strconv.ParseInt(strings.TrimSpace(field), 10, 64)
		if err != nil || n < 1 {
			return o, fmt.Errorf("-input %q: want positive sizes separated by commas", input)
		}
		o.input = append(o.input, n)
	}
	return o, nil
}

// randomBatch returns a tensor of normal values drawn from Go's generator.
func randomBatch(seed int64, shape []int64) (*torch.Tensor, error) {
	n := int64(1)
	for _, s := range shape {
		n *= s
	}
	rng := rand.New(rand.NewSource(seed))
	values := make([]float32, n)
	for i := range values {
		values[i] = float32(rng.NormFloat64())
	}
	return torch.FromFloat32(values, shape...)
}

// forwardOne runs forward and returns its single output.
func forwardOne(outputs []*torch.Tensor, err error) (*torch.Tensor, error) {
	if err != nil {
		return nil, err
	}
	if len(outputs) != 1 {
		for _, t := range outputs {
			t.Close()
		}
		return nil, fmt.Errorf("the model returns %d tensors; this example needs one", len(outputs))
	}
	return outputs[0], nil
}

// student loads the model a second time, restructures it and loads the
// decomposed weights into it.
func student(o options, stdout io.Writer) (*torch.Module, error) {
	loaded, err := torch.Load(o.model)
	if err != nil {
		return nil, err
	}
	model, changes, err := decompose.Network(loaded, o.info)
	if err != nil {
		loaded.Close()
		return nil, err
	}
	if model != loaded {
		loaded.Close() // the model itself was the Conv2d: Network returned a new module
	}
	fmt.Fprintf(stdout, "replaced %d layers\n", len(changes))

	report, err := model.LoadStateDictFromFile(o.weights, true)
	if err != nil {
		model.Close()
		return nil, err
	}
	fmt.Fprintf(stdout, "loaded %d tensors from %s\n", len(report.Loaded), o.weights)
	return model, nil
}

// train runs the SGD steps on one batch and prints each step's loss.
func train(model *torch.Module, x, target *torch.Tensor, o options, stdout io.Writer) error {
	if err := model.Train(true); err != nil {
		return err
	}
	params, err := model.Parameters()
	if err != nil {
		return err
	}
	optimizer, err := torch.NewSGD(params, o.sgd)
	for _, p := range params {
		p.Tensor.Close() // the optimizer keeps its own references
	}
	if err != nil {
		return err
	}
	defer optimizer.Close()

	for step := 1; step <= o.steps; step++ {
		if err := optimizer.ZeroGrad(); err != nil {
			return err
		}
		out, err := forwardOne(model.ForwardTrain(x))
		if err != nil {
			return err
		}
		loss, err := torch.MSELoss(out, target)
		out.Close()
		if err != nil {
			return err
		}
		value, err := loss.Item()
		if err == nil {
			err = loss.Backward()
		}
		loss.Close()
		if err != nil {
			return err
		}
		if err := optimizer.Step(); err != nil {
			return err
		}
		fmt.Fprintf(stdout, "step %d: loss %.6g\n", step, value)
	}
	return model.Eval()
}

func run(args []string, stdout, stderr io.Writer) error {
	o, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	teacher, err := torch.Load(o.model)
	if err != nil {
		return err
	}
	defer teacher.Close()
	if err := teacher.Eval(); err != nil {
		return err
	}
	model, err := student(o, stdout)
	if err != nil {
		return err
	}
	defer model.Close()

	x, err := randomBatch(o.seed, o.input)
	if err != nil {
		return err
	}
	defer x.Close()
	target, err := forwardOne(teacher.Forward(x))
	if err != nil {
		return err
	}
	defer target.Close()
	if err := train(model, x, target, o, stdout); err != nil {
		return err
	}

	for _, path := range []string{o.out, o.state} {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			return err
		}
	}
	if err := model.Save(o.out); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "wrote %s\n", o.out)
	if err := model.SaveStateDict(o.state); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "wrote %s\n", o.state)
	return nil
}

func main() {
	if err := run(os.Args[1:], os.Stdout, os.Stderr); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintln(os.Stderr, "finetune:", err)
		os.Exit(1)
	}
}
