package decompose_test

import (
	"fmt"
	"log"
	"log/slog"
	"os"
	"path/filepath"

	"github.com/convsplit/convsplit/decompose"
	"github.com/convsplit/convsplit/internal/testutil"
	"github.com/convsplit/convsplit/torch"
)

// ExampleAuto decomposes the scripted LowRank model of AMCT's acceptance
// data from its weights, prints the rank chosen for each layer, and writes
// the information file, which is the one AMCT's auto_decomposition wrote.
func ExampleAuto() {
	// The fixture is made by `make fixtures` (scripts/fixtures.py).
	model, err := torch.Load(filepath.Join(testutil.FixtureDir(), "lowrank.pt"))
	if err != nil {
		log.Fatal(err)
	}
	defer model.Close()

	// Warnings only: per-layer details are Debug records.
	logger := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	result, _, info, err := decompose.Auto(model, decompose.AutoOptions{Logger: logger})
	if err != nil {
		log.Fatal(err)
	}
	defer result.Close()

	for _, entry := range info.Entries {
		fmt.Printf("%s: %s, rank %d, first %v, last %v\n",
			entry.Layer.Name, entry.Mode, entry.Rank(), entry.FirstShape, entry.LastShape)
	}

	dir, err := os.MkdirTemp("", "auto")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "decompose_info.json")
	if err := info.WriteFile(path); err != nil {
		log.Fatal(err)
	}
	written, err := os.ReadFile(path)
	if err != nil {
		log.Fatal(err)
	}
	amct, err := os.ReadFile(testutil.AMCT("lowrank", "decompose_info.json"))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println("same bytes as AMCT's file:", string(written) == string(amct))
	// Output:
	// a: SCFK, rank 176, first [176 256 3 1], last [256 176 1 3]
	// b: FCSK, rank 64, first [64 256 5 1], last [128 64 1 3]
	// c: SCFK, rank 96, first [96 128 5 1], last [192 96 1 5]
	// d: SCFK, rank 96, first [96 192 3 1], last [256 96 1 3]
	// same bytes as AMCT's file: true
}
