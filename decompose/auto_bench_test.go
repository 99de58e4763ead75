package decompose_test

import (
	"fmt"
	"os"
	"testing"

	"github.com/convsplit/convsplit/decompose"
	"github.com/convsplit/convsplit/internal/testutil"
	"github.com/convsplit/convsplit/torch"
)

// BenchmarkAuto times Auto on whole zoo models (seed-0 weights). Each
// iteration decomposes a fresh Clone of the loaded model; loading and
// cloning are not timed. vgg16, whose TorchScript file is 528 MB, runs only
// with CONVSPLIT_LARGE=1.
func BenchmarkAuto(b *testing.B) {
	for _, name := range []string{"resnet18", "resnet50", "vgg16"} {
		b.Run(name, func(b *testing.B) {
			if name == "vgg16" && os.Getenv(largeEnv) != "1" {
				b.Skipf("set %s=1 to benchmark vgg16", largeEnv)
			}
			model, err := torch.Load(testutil.Fixture(b, name))
			if err != nil {
				b.Fatal(err)
			}
			defer model.Close()

			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				clone, err := model.Clone()
				if err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				if _, _, _, err := decompose.Auto(clone, decompose.AutoOptions{Logger: quietLogger()}); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				clone.Close()
				b.StartTimer()
			}
		})
	}
}

// BenchmarkAutoLayer times Auto on a model that is one Conv2d with default
// (uniform random) float32 weights, at the layer shapes (C_out, C_in, kh, kw)
// of AMCT's published single-layer timings. The model is left untouched
// (Auto returns a new Sequential for a root Conv2d), so every iteration
// decomposes the same weights.
func BenchmarkAutoLayer(b *testing.B) {
	shapes := [][4]int{{512, 512, 5, 5}, {1024, 1024, 3, 3}, {2048, 2048, 3, 3}}
	for _, shape := range shapes {
		b.Run(fmt.Sprintf("%dx%dx%dx%d", shape[0], shape[1], shape[2], shape[3]), func(b *testing.B) {
			layer := randomConv(b, shape)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				result, _, _, err := decompose.Auto(layer, decompose.AutoOptions{Logger: quietLogger()})
				if err != nil {
					b.Fatal(err)
				}
				result.Close()
			}
		})
	}
}

// randomConv builds a Conv2d of the given weight shape, padded to keep the
// spatial size, in the compilation unit of the root_conv fixture.
func randomConv(b *testing.B, shape [4]int) *torch.Module {
	b.Helper()
	owner, err := torch.Load(testutil.Fixture(b, "root_conv"))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(owner.Close)
	builder, err := torch.NewBuilder(owner)
	if err != nil {
		b.Fatal(err)
	}
	defer builder.Close()
	torch.ManualSeed(0)
	layer, err := builder.Conv2d(torch.Conv2dSpec{
		OutChannels: shape[0], InChannels: shape[1], Groups: 1,
		KernelSize: [2]int{shape[2], shape[3]}, Stride: [2]int{1, 1},
		Padding: [2]int{shape[2] / 2, shape[3] / 2}, Dilation: [2]int{1, 1},
		Bias: true, DType: torch.Float32,
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(layer.Close)
	return layer
}
