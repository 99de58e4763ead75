package torch_test

import (
	"fmt"
	"log"
	"path/filepath"

	"github.com/convsplit/convsplit/internal/testutil"
	"github.com/convsplit/convsplit/torch"
)

// mixedPath is the scripted zoo model Mixed, which TestMain makes.
var mixedPath = filepath.Join(testutil.FixtureDir(), "mixed.pt")

func ExampleLoad() {
	m, err := torch.Load(mixedPath)
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()

	modules, err := m.NamedModules()
	if err != nil {
		log.Fatal(err)
	}
	for _, info := range modules {
		if info.Conv2d {
			fmt.Println(info.Name)
		}
	}
	// Output:
	// stem
	// down
	// tall
	// squeeze
	// blocks.0
	// blocks.1
	// heads.a
	// heads.b
	// tail.0.1
}

func ExampleModule_Conv2d() {
	m, err := torch.Load(mixedPath)
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()

	layer, err := m.Submodule("blocks.0")
	if err != nil {
		log.Fatal(err)
	}
	defer layer.Close()
	g, err := layer.Conv2d()
	if err != nil {
		log.Fatal(err)
	}
	fmt.Printf("in %d, out %d, kernel %v, stride %v, padding %v %s, bias %v, weight %v\n",
		g.InChannels, g.OutChannels, g.KernelSize, g.Stride, g.Padding, g.PaddingMode, g.Bias, g.WeightShape)
	// Output:
	// in 128, out 64, kernel [5 3], stride [1 1], padding [2 1] circular, bias true, weight [64 128 5 3]
}

// ExampleModule_Replace splits the layer "down", a 3x3 Conv2d from 128 to
// 256 channels with stride 2, into a 3x1 and a 1x3 Conv2d through 32
// channels.
func ExampleModule_Replace() {
	m, err := torch.Load(mixedPath)
	if err != nil {
		log.Fatal(err)
	}
	defer m.Close()

	b, err := torch.NewBuilder(m)
	if err != nil {
		log.Fatal(err)
	}
	defer b.Close()
	first, err := b.Conv2d(torch.Conv2dSpec{
		InChannels: 128, OutChannels: 32, Groups: 1,
		KernelSize: [2]int{3, 1}, Stride: [2]int{2, 1}, Padding: [2]int{1, 0}, Dilation: [2]int{1, 1},
		DType: torch.Float32,
	})
	if err != nil {
		log.Fatal(err)
	}
	last, err := b.Conv2d(torch.Conv2dSpec{
		InChannels: 32, OutChannels: 256, Groups: 1,
		KernelSize: [2]int{1, 3}, Stride: [2]int{1, 2}, Padding: [2]int{0, 1}, Dilation: [2]int{1, 1},
		DType: torch.Float32,
	})
	if err != nil {
		log.Fatal(err)
	}
	seq, err := b.Sequential([]*torch.Module{first, last}, nil, false)
	if err != nil {
		log.Fatal(err)
	}
	if err := m.Replace([]string{"down"}, []*torch.Module{seq}); err != nil {
		log.Fatal(err)
	}

	state, err := m.StateDict()
	if err != nil {
		log.Fatal(err)
	}
	for _, entry := range state[:6] {
		fmt.Println(entry.Name, entry.Shape)
	}
	x, err := torch.FromFloat32(make([]float32, 3*32*32), 1, 3, 32, 32)
	if err != nil {
		log.Fatal(err)
	}
	defer x.Close()
	outputs, err := m.Forward(x)
	if err != nil {
		log.Fatal(err)
	}
	defer outputs[0].Close()
	fmt.Println("output", outputs[0].Shape())
	// Output:
	// stem.weight [128 3 3 3]
	// stem.bias [128]
	// down.0.weight [32 128 3 1]
	// down.1.weight [256 32 1 3]
	// tall.weight [256 256 5 3]
	// tall.bias [256]
	// output [1 96 8 16]
}
