package main

import (
	"bytes"
	"encoding/xml"
	"fmt"
	"io"
	"math"
	"path/filepath"
	"strconv"
)

// Chart layout in SVG user units (pixels at 100% zoom).
const (
	chartWidth     = 960.0
	chartTop       = 92.0 // title, subtitle and legend sit above
	chartBottom    = 56.0 // tick labels and the axis title sit below
	chartRight     = 70.0 // room for the value printed after the longest bar
	barHeight      = 11.0
	barGap         = 2.0
	groupPadding   = 8.0
	labelCharWidth = 7.2 // average advance of a 12 px sans-serif character
	beforeColor    = "#4c72b0"
	afterColor     = "#dd8452"
)

// writeSVGFile writes the per-layer latency chart of a bench report to path.
func writeSVGFile(path string, r benchReport) error {
	var b bytes.Buffer
	writeLatencySVG(&b, r)
	if err := writeFileAtomic(path, b.Bytes()); err != nil {
		return fmt.Errorf("writing the chart: %w", err)
	}
	return nil
}

// writeLatencySVG draws a horizontal bar chart: one group per replaced
// layer, with the median latency of the original layer and of the
// Sequential that replaced it, in milliseconds.
func writeLatencySVG(w io.Writer, r benchReport) {
	var layers []benchLayer
	for _, l := range r.Layers {
		if l.MeasuredForward {
			layers = append(layers, l)
		}
	}
	labelWidth := 60.0
	maxValue := 0.0
	for _, l := range layers {
		labelWidth = math.Max(labelWidth, float64(len(displayLayer(l.Name)))*labelCharWidth+16)
		maxValue = math.Max(maxValue, math.Max(l.LatencyBeforeMs, l.LatencyAfterMs))
	}
	step, top := niceTicks(maxValue)
	groupHeight := 2*barHeight + barGap + 2*groupPadding
	plotHeight := math.Max(groupHeight, groupHeight*float64(len(layers)))
	height := chartTop + plotHeight + chartBottom
	left, plotWidth := labelWidth, chartWidth-labelWidth-chartRight
	x := func(v float64) float64 { return left + plotWidth*v/top }

	fmt.Fprintf(w, `<svg xmlns="http://www.w3.org/2000/svg" width="%.0f" height="%.0f" viewBox="0 0 %.0f %.0f" font-family="sans-serif" font-size="12">`+"\n",
		chartWidth, height, chartWidth, height)
	fmt.Fprintf(w, `<rect width="100%%" height="100%%" fill="white"/>`+"\n")
	fmt.Fprintf(w, `<text x="%.0f" y="24" font-size="16" font-weight="bold">%s</text>`+"\n", left,
		escape("Latency of each replaced layer alone, before and after restructuring"))
	subtitle := fmt.Sprintf("%s, input %s (%s), median of %d runs after %d warm-up runs, %d intra-op threads",
		filepath.Base(r.Model), formatShape(r.Input), r.DType, r.Runs, r.Warmup, r.Threads)
	fmt.Fprintf(w, `<text x="%.0f" y="44" fill="#444">%s</text>`+"\n", left, escape(subtitle))
	legend := []struct{ color, text string }{
		{beforeColor, "before: original Conv2d"},
		{afterColor, "after: Sequential of two Conv2d"},
	}
	for i, item := range legend {
		lx := left + float64(i)*260
		fmt.Fprintf(w, `<rect x="%.1f" y="60" width="14" height="14" fill="%s"/>`+"\n", lx, item.color)
		fmt.Fprintf(w, `<text x="%.1f" y="72">%s</text>`+"\n", lx+20, escape(item.text))
	}

	// Grid lines and tick labels along the x axis.
	axisY := chartTop + plotHeight
	for v := 0.0; v <= top+step/2; v += step {
		fmt.Fprintf(w, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="#ddd"/>`+"\n", x(v), chartTop, x(v), axisY)
		fmt.Fprintf(w, `<text x="%.1f" y="%.1f" text-anchor="middle">%s</text>`+"\n", x(v), axisY+18, formatTick(v, step))
	}
	fmt.Fprintf(w, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="black"/>`+"\n", left, axisY, left+plotWidth, axisY)
	fmt.Fprintf(w, `<line x1="%.1f" y1="%.1f" x2="%.1f" y2="%.1f" stroke="black"/>`+"\n", left, chartTop, left, axisY)
	fmt.Fprintf(w, `<text x="%.1f" y="%.1f" text-anchor="middle" font-size="13">%s</text>`+"\n", left+plotWidth/2, axisY+44,
		escape("median forward latency (ms)"))

	if len(layers) == 0 {
		fmt.Fprintf(w, `<text x="%.1f" y="%.1f">%s</text>`+"\n", left+10, chartTop+groupHeight/2, escape("no layer was timed"))
	}
	for i, l := range layers {
		gy := chartTop + float64(i)*groupHeight + groupPadding
		fmt.Fprintf(w, `<text x="%.1f" y="%.1f" text-anchor="end" dominant-baseline="middle">%s</text>`+"\n",
			left-8, gy+barHeight+barGap/2, escape(displayLayer(l.Name)))
		bars := []struct {
			value float64
			color string
		}{{l.LatencyBeforeMs, beforeColor}, {l.LatencyAfterMs, afterColor}}
		for j, bar := range bars {
			by := gy + float64(j)*(barHeight+barGap)
			fmt.Fprintf(w, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"><title>%s</title></rect>`+"\n",
				left, by, x(bar.value)-left, barHeight, bar.color, escape(fmt.Sprintf("%s: %.3f ms", displayLayer(l.Name), bar.value)))
			fmt.Fprintf(w, `<text x="%.1f" y="%.1f" font-size="10" dominant-baseline="middle">%s</text>`+"\n",
				x(bar.value)+4, by+barHeight/2, formatMs(bar.value))
		}
	}
	fmt.Fprintln(w, "</svg>")
}

// niceTicks returns a tick step of 1, 2 or 5 times a power of ten that
// gives at most 8 intervals up to maxValue, and the axis end, a multiple of
// the step at or above maxValue.
func niceTicks(maxValue float64) (step, top float64) {
	if maxValue <= 0 {
		return 1, 1
	}
	raw := maxValue / 8
	magnitude := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 5, 10} {
		step = m * magnitude
		if step >= raw {
			break
		}
	}
	top = math.Ceil(maxValue/step) * step
	return step, top
}

func formatTick(v, step float64) string {
	decimals := 0
	if step < 1 {
		decimals = int(math.Ceil(-math.Log10(step)))
	}
	return fmt.Sprintf("%.*f", decimals, v)
}

// formatMs writes a latency with three significant digits, such as 9.82,
// 35.4 or 123.
func formatMs(v float64) string {
	if v >= 99.5 {
		return strconv.FormatFloat(v, 'f', 0, 64)
	}
	return strconv.FormatFloat(v, 'g', 3, 64)
}

func escape(s string) string {
	var b bytes.Buffer
	xml.EscapeText(&b, []byte(s))
	return b.String()
}
